"""Small Stable Diffusion pipelines built from configs with the real diffusers classes.

Nothing can be downloaded here, so tests build an SD-shaped model (x8 VAE, 4 latent channels,
a CLIP text encoder with its own tiny vocabulary) with random weights and save it exactly as
`save_pretrained` would for a hub model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

# 64 px native: latents of 8x8 keep a 20-step CFG job around a tenth of a second on this CPU.
NATIVE_SIZE = 64


def _bytes_to_unicode() -> dict[int, str]:
    """The GPT-2/CLIP byte-level alphabet: every byte maps to a printable character."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars), strict=True))


def write_tokenizer(folder: Path) -> CLIPTokenizer:
    """A character-level CLIP tokenizer: the byte alphabet, with and without `</w>`."""
    folder.mkdir(parents=True, exist_ok=True)
    alphabet = list(_bytes_to_unicode().values())
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=32
    )
    return tokenizer


def _text_config(
    tokenizer: CLIPTokenizer, hidden: int, layers: int = 2, **extra: int
) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=32,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )


def build_unet(**extra: object) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=NATIVE_SIZE // 8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=8,
        norm_num_groups=8,
        **{"cross_attention_dim": 32, **extra},
    )


def _vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 16, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=NATIVE_SIZE,
    )


def _scheduler() -> EulerDiscreteScheduler:
    return EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
    )


def build_pipeline(folder: Path, seed: int = 0) -> StableDiffusionPipeline:
    torch.manual_seed(seed)
    tokenizer = write_tokenizer(folder / "_tokenizer_source")
    text_encoder = CLIPTextModel(_text_config(tokenizer, 32))
    unet = build_unet()
    pipe = StableDiffusionPipeline(
        vae=_vae(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)
    return pipe


def build_sdxl_pipeline(folder: Path, seed: int = 0) -> StableDiffusionXLPipeline:
    """An SDXL-shaped model: two text encoders (the second with a projection) feeding a UNet with
    `text_time` added embeddings, the layout `StableDiffusionXLPipeline.save_pretrained` writes."""
    torch.manual_seed(seed)
    tokenizer = write_tokenizer(folder / "_tokenizer_source")
    # Two widths, as CLIP ViT-L (768) and OpenCLIP bigG (1280): diffusers' single-file loader
    # tells the encoders apart by width. Ten layers in the second: it recognises an SDXL
    # checkpoint by the OpenCLIP encoder's 10th block.
    text_encoder = CLIPTextModel(_text_config(tokenizer, 16))
    text_encoder_2 = CLIPTextModelWithProjection(
        _text_config(tokenizer, 24, layers=10, projection_dim=24)
    )
    # The UNet attends to both encoders' hidden states side by side (16 + 24) and adds the
    # pooled projection (24) and six size/crop numbers (6 x 8) as `text_time` embeddings.
    unet = build_unet(
        cross_attention_dim=16 + 24,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=24 + 6 * 8,
    )
    pipe = StableDiffusionXLPipeline(
        vae=_vae(),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=_scheduler(),
        add_watermarker=False,
    )
    pipe.save_pretrained(folder)
    return pipe


def build_lora(pipe: StableDiffusionPipeline, path: Path, seed: int = 0, rank: int = 4) -> Path:
    """A LoRA for `pipe`'s UNet attention, saved as diffusers writes one (`save_lora_weights`).

    peft initialises LoRA's B matrices to zero (a LoRA that changes nothing); random ones make
    a LoRA whose effect a test can see. The pipeline is left without the adapter.
    """
    torch.manual_seed(seed)
    config = LoraConfig(
        r=rank,
        lora_alpha=rank,
        target_modules=["to_q", "to_k", "to_v", "to_out.0"],
        init_lora_weights=False,
    )
    pipe.unet.add_adapter(config, adapter_name="build")
    layers = get_peft_model_state_dict(pipe.unet, adapter_name="build")
    pipe.unet.delete_adapters("build")
    path.parent.mkdir(parents=True, exist_ok=True)
    type(pipe).save_lora_weights(path.parent, unet_lora_layers=layers, weight_name=path.name)
    return path


def build_controlnet(unet: UNet2DConditionModel, folder: Path, seed: int = 0) -> ControlNetModel:
    """A ControlNet copying `unet`, saved as a diffusers folder.

    `from_unet` zeroes the convolutions that read the control image and those that feed the
    UNet (a ControlNet that changes nothing until trained); random ones make a ControlNet whose
    effect, and its control image's, a test can see.
    """
    torch.manual_seed(seed)
    net = ControlNetModel.from_unet(unet)
    with torch.no_grad():
        # He initialisation keeps the control image's signal through the embedding's convs.
        for conv in net.controlnet_cond_embedding.modules():
            if isinstance(conv, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(conv.weight)
        for conv in (*net.controlnet_down_blocks, net.controlnet_mid_block):
            conv.weight.normal_(0, 0.3)
    net.save_pretrained(folder)
    return net
