"""ControlNets: diffusers folders and single `.safetensors` files in a controlnets folder.

A folder is a ControlNet if its `config.json` names `ControlNetModel`; a file if its keys are a
ControlNet's (diffusers' own detection, from the safetensors header only). Each is listed under
its path relative to the folder (a file without `.safetensors`), with the family whose UNet it
was trained beside, told apart by the cross-attention width as models are (`models.py`).

A job's ControlNets must match its model's UNet: same cross-attention width and, for SDXL, the
same added embeddings; anything else is refused before a step runs. Loaded ControlNets stay in
a small cache on the device, so a painter's next job does not read them again.
"""

from __future__ import annotations

import inspect
import json
import logging
import tempfile
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import ControlNetModel, UNet2DConditionModel
from diffusers.loaders.single_file_utils import infer_diffusers_model_type

from .. import tiny
from ..wire.protocol import ErrorCode, ProtocolError
from .listing import FolderListing
from .models import SD1, SD2, SD2_CROSS_ATTENTION_DIM, SDXL, _HeaderShapes, _size

log = logging.getLogger(__name__)

SDXL_CROSS_ATTENTION_DIM = 2048
# How many ControlNets stay loaded after their job: an SDXL one holds 2.5 GB in fp16, and the
# model itself needs the device's memory more. A job's own ControlNets are all loaded while it
# runs, however many it names.
CACHED = 2
# `infer_diffusers_model_type` names of the ControlNets whose keys it recognises.
CONTROLNET_TYPES = ("controlnet", "controlnet_xl_large", "controlnet_xl_mid", "controlnet_xl_small")


@dataclass(frozen=True)
class ControlNetEntry:
    name: str
    path: Path  # a diffusers folder or a .safetensors file
    family: str
    cross_attention_dim: int
    size_bytes: int
    # A folder's, from its config; a single file gets its model's UNet's when it loads.
    block_out_channels: tuple[int, ...] | None = None

    def to_dict(self) -> dict[str, object]:
        return {"name": self.name, "family": self.family, "size_bytes": self.size_bytes}

    def fits(self, unet: UNet2DConditionModel) -> bool:
        """Whether it can steer this UNet: made for its family, at its context width (and,
        where known, for its channels: the embedded model's shares SD 1.x's family)."""
        channels = tuple(unet.config.block_out_channels)
        return (self.family, self.cross_attention_dim) == steered_by(unet) and (
            self.block_out_channels in (None, channels)
        )


def steered_by(unet: UNet2DConditionModel) -> tuple[str, int]:
    """What a ControlNet for this UNet is made for: its family and context width."""
    cross = int(unet.config.cross_attention_dim)
    return family_of(cross, unet.config.addition_embed_type == "text_time"), cross


def family_of(cross_attention_dim: int, text_time: bool) -> str:
    """The family of a UNet or ControlNet from its cross-attention width and whether it takes
    SDXL's added text and time embeddings."""
    if text_time or cross_attention_dim == SDXL_CROSS_ATTENTION_DIM:
        return SDXL
    return SD2 if cross_attention_dim == SD2_CROSS_ATTENTION_DIM else SD1


def describe_folder(path: Path, name: str) -> ControlNetEntry | None:
    config_path = path / "config.json"
    if not config_path.is_file():
        return None
    config = json.loads(config_path.read_text())
    if config.get("_class_name") != "ControlNetModel":
        return None
    cross = int(config.get("cross_attention_dim", 768))
    family = family_of(cross, config.get("addition_embed_type") == "text_time")
    channels = tuple(config.get("block_out_channels", (320, 640, 1280, 1280)))
    return ControlNetEntry(name, path, family, cross, _size(path), channels)


def describe_file(path: Path, name: str) -> ControlNetEntry | None:
    keys = _HeaderShapes(path)
    if infer_diffusers_model_type(keys) not in CONTROLNET_TYPES:
        return None
    # Diffusers' keys and the original (A1111) ones both end so; the weight is (width, context).
    cross = next((keys[k].shape[1] for k in sorted(keys) if k.endswith("attn2.to_k.weight")), 768)
    text_time = (
        "add_embedding.linear_1.weight" in keys or "control_model.label_emb.0.0.weight" in keys
    )
    return ControlNetEntry(name, path, family_of(cross, text_time), cross, path.stat().st_size)


def embedded_controlnets() -> list[ControlNetEntry]:
    """The embedded model's ControlNet, when the package has its weights."""
    if not tiny.controlnet_is_present():
        return []
    entry = describe_folder(tiny.CONTROLNET_DIR, tiny.CONTROLNET_NAME)
    return [entry] if entry is not None else []


class ControlNetRegistry(FolderListing[ControlNetEntry]):
    """The ControlNets of a folder by name: a folder's relative path, a file's without
    `.safetensors`; the daemon lists `embedded_controlnets` before them."""

    def fitting(self, unet: UNet2DConditionModel) -> ControlNetEntry | None:
        """The first listed ControlNet that can steer `unet` (the embedded model's own for
        it): what a control entry without a model gets."""
        return next((entry for entry in self.entries() if entry.fits(unet)), None)

    def scan(self, folder: Path) -> list[ControlNetEntry]:
        found = []
        pending = [folder]
        while pending:
            current = pending.pop()
            for path in sorted(current.iterdir()):
                if path.name.startswith("."):
                    continue
                relative = path.relative_to(folder)
                try:
                    if path.is_dir():
                        entry = describe_folder(path, relative.as_posix())
                        if entry is None and not path.is_symlink():
                            pending.append(path)
                    elif path.suffix == ".safetensors":
                        entry = describe_file(path, relative.with_suffix("").as_posix())
                    else:
                        continue
                except Exception as exc:  # one broken file must not hide the rest
                    log.warning("skipping ControlNet %s: %s", path, exc)
                    continue
                if entry is not None:
                    found.append(entry)
        return found


class ControlNetCache:
    """Loaded ControlNets on one device, the least recently used dropped beyond CACHED."""

    def __init__(self, device: torch.device, dtype: torch.dtype) -> None:
        self.device = device
        self.dtype = dtype
        self._loaded: OrderedDict[tuple[str, Path, int], ControlNetModel] = OrderedDict()

    def get(
        self, entry: ControlNetEntry, unet: UNet2DConditionModel, model: str
    ) -> ControlNetModel:
        """The entry's ControlNet, loaded if need be; `controlnet_load_failed` if it is made
        for another family than `unet` (of the model `model`) or does not load."""
        unet_family, unet_cross = steered_by(unet)
        if not entry.fits(unet):
            raise ProtocolError(
                ErrorCode.CONTROLNET_LOAD_FAILED,
                f"ControlNet {entry.name!r} is made for {entry.family} models (context width "
                f"{entry.cross_attention_dim}, channels {entry.block_out_channels}); model "
                f"{model!r} is {unet_family} (width {unet_cross}, channels "
                f"{tuple(unet.config.block_out_channels)})",
                "control",
            )
        try:
            key = (entry.name, entry.path, entry.path.stat().st_mtime_ns)  # a replaced file anew
            if key in self._loaded:
                self._loaded.move_to_end(key)
                return self._loaded[key]
            net = self._load(entry, unet)
        except Exception as exc:
            log.warning("cannot load ControlNet %s: %s", entry.path, exc)
            raise ProtocolError(
                ErrorCode.CONTROLNET_LOAD_FAILED,
                f"ControlNet {entry.name!r} did not load ({type(exc).__name__}): a single file "
                f"must have its model's architecture; others load as a diffusers folder",
                "control",
            ) from exc
        net = net.to(self.device, self.dtype).eval()
        self._loaded[key] = net
        while len(self._loaded) > CACHED:
            self._loaded.popitem(last=False)
        return net

    def _load(self, entry: ControlNetEntry, unet: UNet2DConditionModel) -> ControlNetModel:
        if entry.path.is_dir():
            return ControlNetModel.from_pretrained(entry.path, use_safetensors=True)
        # A single file carries no config, and diffusers would fetch a reference one from the
        # hub: the model's own UNet gives the architecture a full ControlNet copies.
        with tempfile.TemporaryDirectory() as folder:
            (Path(folder) / "config.json").write_text(json.dumps(controlnet_config(unet.config)))
            return ControlNetModel.from_single_file(str(entry.path), config=folder)


def controlnet_config(unet_config: Mapping[str, Any]) -> dict[str, Any]:
    """The config of a ControlNet copying a UNet (what `ControlNetModel.from_unet` builds)."""
    parameters = inspect.signature(ControlNetModel.__init__).parameters
    kept = {k: v for k, v in unet_config.items() if k in parameters}
    return {"_class_name": "ControlNetModel", **kept}
