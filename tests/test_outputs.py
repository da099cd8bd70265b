"""The output folder: a PNG file exists, complete with its metadata, from the first write on."""

from __future__ import annotations

import fcntl
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdbridge.daemon.outputs import OutputFolder, rgba_bytes
from sdbridge.daemon.parameters import GenerationInfo


def _image() -> Image.Image:
    gradient = np.linspace(0, 255, 48 * 40 * 3).reshape(40, 48, 3)
    return Image.fromarray(gradient.astype(np.uint8))


def _info(prompt: str) -> GenerationInfo:
    return GenerationInfo(prompt, "", 20, "Euler", 7.5, 7, 48, 40, "tiny")


def _read(path: Path) -> tuple[bytes, str]:
    with Image.open(path) as png:
        return png.convert("RGB").tobytes(), png.text["parameters"]


@pytest.mark.parametrize("prompt", ["a red circle", "ein Baum über dem Fluß", "猫 on a mat"])
def test_stored_file_is_complete_and_compressing_keeps_pixels_and_metadata(
    tmp_path: Path, prompt: str
) -> None:
    image, info = _image(), _info(prompt)
    saved = OutputFolder(tmp_path).save(image, info, rgba_bytes(image))
    assert saved.stored and saved.path.read_bytes() == saved.png
    assert _read(saved.path) == (image.tobytes(), info.to_parameters())

    OutputFolder(tmp_path).compress(saved)
    assert saved.path.stat().st_size < len(saved.png)
    assert _read(saved.path) == (image.tobytes(), info.to_parameters())
    assert [p.name for p in saved.path.parent.iterdir()] == [saved.path.name]  # no temporary


def test_without_rgba_the_file_is_compressed_at_once_and_numbers_go_up(tmp_path: Path) -> None:
    folder = OutputFolder(tmp_path)
    first = folder.save(_image(), _info("one"))
    second = folder.save(_image(), _info("two"))
    assert not first.stored and first.path.read_bytes() == first.png
    assert (first.path.name, second.path.name) == ("00001-7.png", "00002-7.png")
    folder.compress(first)  # nothing to do
    assert first.path.read_bytes() == first.png


def test_rgba_bytes_match_pillows_conversion_after_a_resize() -> None:
    image = _image().resize((97, 61), Image.LANCZOS)  # resampling leaves Pillow's pad byte at 0
    assert bytes(rgba_bytes(image)) == image.convert("RGBA").tobytes()
    grey = image.convert("L")
    assert bytes(rgba_bytes(grey)) == grey.convert("RGBA").tobytes()


def test_opening_the_folder_removes_only_temporaries_no_writer_holds(tmp_path: Path) -> None:
    day = tmp_path / "2026-11-27"
    day.mkdir()
    stale = [day / ".sdbridge-0123456789abcdef.png.tmp", day / ".00002-7.png.tmp"]
    held = day / ".sdbridge-fedcba9876543210.png.tmp"
    kept = [day / "00001-7.png", day / ".notes.tmp", tmp_path / "elsewhere" / stale[0].name]
    kept[-1].parent.mkdir()
    for path in [*stale, held, *kept]:
        path.write_bytes(b"partial")
    with open(held, "rb") as writer:  # a live daemon still writing it
        fcntl.flock(writer, fcntl.LOCK_EX)
        OutputFolder(tmp_path)
    assert sorted(_files(tmp_path)) == sorted([held, *kept])


def _files(folder: Path) -> list[Path]:
    return [path for path in folder.rglob("*") if path.is_file()]
