"""Finished images on disk: PNG files with AUTOMATIC1111-style `parameters` metadata.

Image browsers and A1111's "PNG Info" read the `parameters` text chunk, so every image the daemon
makes can be traced back to its prompt and seed even if the client that asked went away.
"""

from __future__ import annotations

import datetime
import os
import re
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from PIL.PngImagePlugin import PngInfo

_NUMBERED = re.compile(r"^(\d{5})-")


@dataclass(frozen=True)
class GenerationInfo:
    """What A1111 records about an image; `to_parameters` renders its text format."""

    prompt: str
    negative_prompt: str
    steps: int
    sampler: str
    cfg_scale: float
    seed: int
    width: int
    height: int
    model: str
    denoising_strength: float | None = None

    def to_parameters(self) -> str:
        fields = [
            f"Steps: {self.steps}",
            f"Sampler: {self.sampler}",
            f"CFG scale: {self.cfg_scale:g}",
            f"Seed: {self.seed}",
            f"Size: {self.width}x{self.height}",
            f"Model: {self.model}",
        ]
        if self.denoising_strength is not None:
            fields.append(f"Denoising strength: {self.denoising_strength:g}")
        lines = [self.prompt]
        if self.negative_prompt:
            lines.append(f"Negative prompt: {self.negative_prompt}")
        lines.append(", ".join(fields))
        return "\n".join(lines)


def default_output_dir() -> Path:
    pictures = Path.home() / "Pictures"
    return (pictures if pictures.is_dir() else Path.home()) / "sdbridge"


class OutputFolder:
    """Numbered PNGs in one subfolder per day: `2026-11-27/00001-1234.png`."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def save(self, image: Image.Image, info: GenerationInfo) -> Path:
        folder = self.root / datetime.date.today().isoformat()
        folder.mkdir(parents=True, exist_ok=True)
        metadata = PngInfo()
        metadata.add_text("parameters", info.to_parameters())
        number = self._next_number(folder)
        while True:
            path = folder / f"{number:05d}-{info.seed}.png"
            try:
                # "x" so that two daemons sharing a folder never overwrite each other's images.
                with open(path, "xb") as file:
                    image.save(file, format="PNG", pnginfo=metadata, compress_level=1)
                return path
            except FileExistsError:
                number += 1

    @staticmethod
    def _next_number(folder: Path) -> int:
        numbers = (_NUMBERED.match(name) for name in os.listdir(folder))
        return max((int(m.group(1)) for m in numbers if m), default=0) + 1
