"""LoRAs: `.safetensors` files in a loras folder, applied to one job and removed after it.

diffusers converts the formats found on model sites (kohya, A1111, diffusers/peft) when loading.
Each job loads its LoRAs as named peft adapters on the shared base weights, weights them with
`set_adapters`, and unloads them afterwards, which leaves the base layers exactly as they were:
the next job, with or without LoRAs, sees the base model's own pixels.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from diffusers import DiffusionPipeline
from safetensors.torch import load_file

from ..wire.protocol import ErrorCode, ProtocolError
from .listing import FolderListing

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoraEntry:
    name: str
    path: Path
    size_bytes: int

    def to_dict(self) -> dict[str, object]:
        return {"name": self.name, "size_bytes": self.size_bytes}


class LoraRegistry(FolderListing[LoraEntry]):
    """The LoRAs of a folder by name: relative path without `.safetensors`."""

    def scan(self, folder: Path) -> list[LoraEntry]:
        entries = []
        for path in sorted(folder.rglob("*.safetensors")):
            if any(part.startswith(".") for part in path.relative_to(folder).parts):
                continue
            try:
                size = path.stat().st_size
            except OSError as exc:  # a dangling link, or removed while scanning
                log.warning("skipping LoRA %s: %s", path, exc)
                continue
            entries.append(
                LoraEntry(path.relative_to(folder).with_suffix("").as_posix(), path, size)
            )
        return entries


@contextlib.contextmanager
def applied(pipe: DiffusionPipeline, loras: list[tuple[LoraEntry, float]]) -> Iterator[None]:
    """The pipeline's shared components carry these LoRAs at these weights inside the block."""
    if not loras:
        yield
        return
    adapters = [f"sdbridge_{i}" for i in range(len(loras))]
    try:
        for adapter, (entry, _) in zip(adapters, loras, strict=True):
            _load(pipe, entry, adapter)
        pipe.set_adapters(adapters, [weight for _, weight in loras])
        yield
    finally:
        pipe.unload_lora_weights()


def _load(pipe: DiffusionPipeline, entry: LoraEntry, adapter: str) -> None:
    """Load one LoRA as `adapter`, or refuse the job with `lora_load_failed` naming it (the
    reason without paths; the daemon's log has the details)."""
    try:
        # A state dict, not a path: diffusers would treat a path it cannot open as a hub id.
        state = load_file(str(entry.path))
    except Exception as exc:
        log.warning("cannot read LoRA %s: %s", entry.path, exc)
        raise ProtocolError(
            ErrorCode.LORA_LOAD_FAILED,
            f"lora {entry.name!r} did not load: not a readable .safetensors file",
            "loras",
        ) from exc
    try:
        pipe.load_lora_weights(state, adapter_name=adapter)
    except Exception as exc:
        log.warning("cannot load LoRA %s: %s", entry.path, exc)
        raise ProtocolError(
            ErrorCode.LORA_LOAD_FAILED,
            f"lora {entry.name!r} did not load: it holds no LoRA weights for this model's "
            f"layers ({type(exc).__name__}; a LoRA of another family?)",
            "loras",
        ) from exc
