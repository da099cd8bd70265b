"""Finished images on disk: PNG files with AUTOMATIC1111-style `parameters` metadata.

Image browsers and A1111's "PNG Info" read the `parameters` text chunk, so every image the daemon
makes can be traced back to its prompt and seed even if the client that asked went away.
"""

from __future__ import annotations

import datetime
import io
import logging
import os
import re
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from PIL.PngImagePlugin import PngInfo

_NUMBERED = re.compile(r"^(\d{5})-")
_log = logging.getLogger("sdbridge.outputs")


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


@dataclass(frozen=True)
class SavedImage:
    path: Path
    png: bytes  # the file's bytes as written
    image: Image.Image
    info: GenerationInfo
    stored: bool  # written uncompressed: `OutputFolder.compress` rewrites it


def _chunk(kind: bytes, body: bytes = b"") -> list[bytes]:
    return [
        struct.pack(">I", len(body)),
        kind,
        body,
        struct.pack(">I", zlib.crc32(body, zlib.crc32(kind))),
    ]


def _text_chunk(key: str, text: str) -> list[bytes]:
    try:
        return _chunk(b"tEXt", key.encode("latin-1") + b"\0" + text.encode("latin-1"))
    except UnicodeEncodeError:  # like Pillow: other text goes to iTXt (UTF-8, no compression)
        return _chunk(b"iTXt", key.encode("latin-1") + b"\0\0\0\0\0" + text.encode("utf-8"))


def stored_png(width: int, height: int, rgba: bytes, text: dict[str, str]) -> bytes:
    """An RGBA PNG with its pixels stored, not deflated: a few memory copies even at 16 MP.

    Encoding with Pillow costs tens of milliseconds per megapixel here (row filters, deflate),
    which is the whole budget of a one-second job; this is a complete PNG at once.
    """
    stride = width * 4
    view = memoryview(rgba)
    # Each row starts with its filter type, 0 (None).
    rows = b"".join(
        part
        for start in range(0, height * stride, stride)
        for part in (b"\0", view[start : start + stride])
    )
    parts = [
        b"\x89PNG\r\n\x1a\n",
        *_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)),
    ]
    for key, value in text.items():
        parts += _text_chunk(key, value)
    parts += [*_chunk(b"IDAT", zlib.compress(rows, 0)), *_chunk(b"IEND")]
    return b"".join(parts)


def _metadata(info: GenerationInfo) -> PngInfo:
    metadata = PngInfo()
    metadata.add_text("parameters", info.to_parameters())
    return metadata


class OutputFolder:
    """Numbered PNGs in one subfolder per day: `2026-11-27/00001-1234.png`.

    The protocol promises the file exists when the `result` goes out. Deflating costs tens of
    milliseconds per megapixel, so when the client wants raw pixels the file is first written
    stored (uncompressed) and `compress` rewrites it after the result is sent; the file is
    complete, with its metadata, all the time.
    """

    def __init__(self, root: Path) -> None:
        self.root = root

    def save(
        self, image: Image.Image, info: GenerationInfo, rgba: bytes | None = None
    ) -> SavedImage:
        """Save ``image``: stored from its RGBA bytes if given, else compressed right away."""
        if rgba is None:
            buffer = io.BytesIO()
            image.save(buffer, format="PNG", pnginfo=_metadata(info), compress_level=1)
            png = buffer.getvalue()
        else:
            png = stored_png(image.width, image.height, rgba, {"parameters": info.to_parameters()})
        folder = self.root / datetime.date.today().isoformat()
        folder.mkdir(parents=True, exist_ok=True)
        number = self._next_number(folder)
        while True:
            path = folder / f"{number:05d}-{info.seed}.png"
            try:
                # "x" so that two daemons sharing a folder never overwrite each other's images.
                with open(path, "xb") as file:
                    file.write(png)
                return SavedImage(path, png, image, info, stored=rgba is not None)
            except FileExistsError:
                number += 1

    def compress(self, saved: SavedImage) -> None:
        """Replace a stored file by a compressed one, atomically: readers see one or the other.

        Failing leaves the stored file, which is complete: only logged.
        """
        if not saved.stored:
            return
        temporary = saved.path.with_name(f".{saved.path.name}.tmp")  # not a numbered name
        try:
            with open(temporary, "wb") as file:
                saved.image.save(
                    file, format="PNG", pnginfo=_metadata(saved.info), compress_level=1
                )
            if saved.path.exists():  # the user may have moved it away meanwhile
                os.replace(temporary, saved.path)
        except OSError as exc:
            _log.warning("cannot compress %s (it stays uncompressed): %s", saved.path, exc)
        finally:
            temporary.unlink(missing_ok=True)

    @staticmethod
    def _next_number(folder: Path) -> int:
        numbers = (_NUMBERED.match(name) for name in os.listdir(folder))
        return max((int(m.group(1)) for m in numbers if m), default=0) + 1
