"""Original-format (LDM / AUTOMATIC1111) single-file checkpoints written from diffusers pipelines.

The inverse of diffusers' single-file loader for Stable Diffusion 1.x
(`diffusers.loaders.single_file_utils`: `convert_ldm_unet_checkpoint`,
`convert_ldm_vae_checkpoint`, `convert_ldm_clip_checkpoint`), written independently of it so that
loading the result with `from_single_file` tests that loader rather than echoing it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors.torch import save_file

# A checkpoint and its folder load equal weights at different memory offsets (each file's own
# layout): vectorised kernels then split their sums differently, and a channel value may round
# the other way (seen on an AVX2-only CPU). A wrong load is off by far more than this.
PIXEL_TOLERANCE = 2

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_ENCODER_PREFIX = "cond_stage_model.transformer.text_model."

# diffusers module name -> LDM module name; a name matches itself or itself followed by ".".
UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
    # SDXL's pooled text + size/crop embedding (`addition_embed_type="text_time"`).
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
}
UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
UNET_SAMPLER = {"conv": "op"}  # a downsampler's conv; upsamplers keep `conv`
VAE_TOP = {"conv_norm_out": "norm_out"}
VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
VAE_ATTENTION = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
}

BLOCK = re.compile(
    r"(?:(?P<part>encoder|decoder)\.)?(?P<where>down_blocks|up_blocks|mid_block)\.(?:(?P<block>\d+)\.)?"
    r"(?P<kind>resnets|attentions|downsamplers|upsamplers)\.(?P<layer>\d+)\.(?P<rest>.+)"
)


def _rename(name: str, table: dict[str, str]) -> str:
    for old, new in table.items():
        if name == old or name.startswith(old + "."):
            return new + name[len(old) :]
    return name


def _unet_key(key: str, per_block: int, up_blocks_with_attention: set[int]) -> str:
    """`down_blocks.B.resnets.L` -> `input_blocks.N.0` etc., numbered as LDM's flat block lists."""
    match = BLOCK.fullmatch(key)
    if match is None:
        return _rename(key, UNET_TOP)
    where, kind, rest = match["where"], match["kind"], match["rest"]
    block, layer, step = int(match["block"] or 0), int(match["layer"]), per_block + 1
    sub = 0 if kind == "resnets" else 1
    if where == "mid_block":  # resnet, attention, resnet
        module = f"middle_block.{2 * layer if kind == 'resnets' else 1}"
    elif kind == "downsamplers":
        module, rest = f"input_blocks.{1 + block * step + per_block}.0", _rename(rest, UNET_SAMPLER)
    elif kind == "upsamplers":
        sub = 2 if block in up_blocks_with_attention else 1
        module = f"output_blocks.{block * step + per_block}.{sub}"
    elif where == "down_blocks":
        module = f"input_blocks.{1 + block * step + layer}.{sub}"
    else:
        module = f"output_blocks.{block * step + layer}.{sub}"
    return f"{module}.{_rename(rest, UNET_RESNET) if kind == 'resnets' else rest}"


def _vae_key(key: str, num_blocks: int) -> str:
    """`encoder.down_blocks.B.resnets.L` -> `encoder.down.B.block.L`; the decoder runs reversed."""
    match = BLOCK.fullmatch(key)
    if match is None:
        part, _, rest = key.partition(".")
        return f"{part}.{_rename(rest, VAE_TOP)}" if part in ("encoder", "decoder") else key
    part, where, kind, rest = match["part"], match["where"], match["kind"], match["rest"]
    block, layer = int(match["block"] or 0), int(match["layer"])
    if where == "mid_block":
        module = f"mid.block_{layer + 1}" if kind == "resnets" else "mid.attn_1"
    elif where == "down_blocks":
        module = f"down.{block}." + ("downsample" if kind == "downsamplers" else f"block.{layer}")
    else:
        up = num_blocks - 1 - block
        module = f"up.{up}." + ("upsample" if kind == "upsamplers" else f"block.{layer}")
    table = {"resnets": VAE_RESNET, "attentions": VAE_ATTENTION}.get(kind, {})
    return f"{part}.{module}.{_rename(rest, table)}"


def _vae_tensor(ldm_key: str, tensor: torch.Tensor) -> torch.Tensor:
    """LDM's VAE attention projections are 1x1 convolutions, diffusers' are linear layers."""
    if ".mid.attn_1." in ldm_key and ldm_key.endswith(".weight") and tensor.ndim == 2:
        return tensor[:, :, None, None]
    return tensor


def ldm_state_dict(pipe: StableDiffusionPipeline) -> dict[str, torch.Tensor]:
    """The pipeline's UNet, VAE and CLIP text encoder weights under their LDM names."""
    unet_state = pipe.unet.state_dict()
    per_block = pipe.unet.config.layers_per_block
    with_attention = {
        int(m[1]) for k in unet_state if (m := re.match(r"up_blocks\.(\d+)\.attentions", k))
    }
    num_vae_blocks = len(pipe.vae.config.up_block_types)
    parts: list[tuple[str, dict[str, torch.Tensor], Callable[[str], str]]] = [
        (UNET_PREFIX, unet_state, lambda k: _unet_key(k, per_block, with_attention)),
        (VAE_PREFIX, pipe.vae.state_dict(), lambda k: _vae_key(k, num_vae_blocks)),
        # transformers >= 5.6 drops the `text_model.` level from CLIPTextModel's state dict.
        (
            TEXT_ENCODER_PREFIX,
            pipe.text_encoder.state_dict(),
            lambda k: k.removeprefix("text_model."),
        ),
    ]
    state: dict[str, torch.Tensor] = {}
    for prefix, weights, rename in parts:
        for key, tensor in weights.items():
            ldm_key = prefix + rename(key)
            if ldm_key in state:
                raise ValueError(f"{key} and another weight both map to {ldm_key}")
            state[ldm_key] = _vae_tensor(ldm_key, tensor) if prefix == VAE_PREFIX else tensor
    return state


def write_single_file_checkpoint(pipe: StableDiffusionPipeline, path: Path) -> Path:
    """Save the pipeline as one original-format `.safetensors` file, as AUTOMATIC1111 users have."""
    state = {
        key: tensor.detach().contiguous().cpu() for key, tensor in ldm_state_dict(pipe).items()
    }
    save_file(state, str(path))
    return path


# SDXL: CLIP ViT-L in transformers' naming, OpenCLIP ViT-bigG in OpenCLIP's own.
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer.text_model."
SDXL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."
OPEN_CLIP_TOP = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}
OPEN_CLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}
LAYER = re.compile(r"encoder\.layers\.(\d+)\.(.+)")


def _open_clip_state(encoder: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A CLIPTextModelWithProjection under OpenCLIP's names: q, k and v fused into `in_proj`,
    the projection transposed (OpenCLIP multiplies by it from the right)."""
    weights = {key.removeprefix("text_model."): t for key, t in encoder.state_dict().items()}
    state = {"text_projection": weights.pop("text_projection.weight").T}
    for key, tensor in weights.items():
        if key in OPEN_CLIP_TOP:
            state[OPEN_CLIP_TOP[key]] = tensor
            continue
        match = LAYER.fullmatch(key)
        if match is None:
            raise ValueError(f"no OpenCLIP name for {key}")
        layer, rest = match.groups()
        block = f"transformer.resblocks.{layer}."
        if rest.startswith(("self_attn.q_proj.", "self_attn.k_proj.", "self_attn.v_proj.")):
            kind = rest.rsplit(".", 1)[1]
            if rest.startswith("self_attn.q_proj."):
                parts = [
                    weights[f"encoder.layers.{layer}.self_attn.{p}_proj.{kind}"] for p in "qkv"
                ]
                state[f"{block}attn.in_proj_{kind}"] = torch.cat(parts)
            continue
        state[block + _rename(rest, OPEN_CLIP_LAYER)] = tensor
    return state


def sdxl_ldm_state_dict(pipe: StableDiffusionXLPipeline) -> dict[str, torch.Tensor]:
    """An SDXL pipeline's weights under the names of Stability's single-file SDXL checkpoints:
    the UNet and VAE as in SD 1.x, the two text encoders under `conditioner.embedders`."""
    state = {
        key: tensor
        for key, tensor in ldm_state_dict(pipe).items()
        if not key.startswith(TEXT_ENCODER_PREFIX)
    }
    clip = pipe.text_encoder.state_dict().items()
    state.update((SDXL_CLIP_PREFIX + key.removeprefix("text_model."), t) for key, t in clip)
    open_clip = _open_clip_state(pipe.text_encoder_2).items()
    state.update((SDXL_OPEN_CLIP_PREFIX + key, tensor) for key, tensor in open_clip)
    return state


def write_sdxl_single_file_checkpoint(pipe: StableDiffusionXLPipeline, path: Path) -> Path:
    """Save an SDXL pipeline as one `.safetensors` file in the original layout."""
    state = {key: t.detach().contiguous().cpu() for key, t in sdxl_ldm_state_dict(pipe).items()}
    save_file(state, str(path))
    return path


def assert_same_weights(want: DiffusionPipeline, got: DiffusionPipeline) -> None:
    """Every weight of every model component of `got` equals `want`'s, tensor by tensor."""
    for name, component in want.components.items():
        if not isinstance(component, torch.nn.Module):
            continue
        expected, loaded = component.state_dict(), got.components[name].state_dict()
        assert expected.keys() == loaded.keys(), name
        unequal = [key for key in expected if not torch.equal(expected[key], loaded[key])]
        assert not unequal, f"{name}: {unequal}"


def assert_same_picture(got: np.ndarray, want: np.ndarray) -> None:
    """Two images of one job from two loads of the same weights agree within PIXEL_TOLERANCE."""
    assert got.shape == want.shape
    difference = np.abs(got.astype(np.int32) - want.astype(np.int32)).max()
    assert difference <= PIXEL_TOLERANCE, f"off by up to {difference}"
