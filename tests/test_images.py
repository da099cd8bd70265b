"""Request images: every PNG is read (header, then pixels) before a job is accepted, so that a
lying, oversized, foreign or broken one gets one `error` naming its field and no `accepted`."""

from __future__ import annotations

import io
import re
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from helpers import DaemonProcess, Peer, pixels, raw_image
from PIL import Image

from sdbridge.wire import protocol
from sdbridge.wire.protocol import Limits, ProtocolError

JOB = {"prompt": "a red circle on a blue background", "num_inference_steps": 2, "seed": 3}


def png_bytes(image: Image.Image, fmt: str = "PNG", **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def png_map(data: bytes, width: int, height: int) -> dict[str, object]:
    return {"width": width, "height": height, "format": "png", "data": data}


def noisy(width: int, height: int) -> Image.Image:
    """An image that does not compress: its PNG's pixel data fills most of the file."""
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), np.uint8))


def with_corrupt_header(data: bytes) -> bytes:
    corrupt = bytearray(data)
    corrupt[20] ^= 0xFF  # a byte of the height: the IHDR's CRC no longer matches
    return bytes(corrupt)


# --- the header, read in pure Python (protocol.py runs in the editors too) ---------------------


@pytest.mark.parametrize(
    ("mode", "options"),
    [("RGBA", {}), ("RGB", {"interlace": 1}), ("L", {}), ("1", {}), ("P", {}), ("I;16", {})],
)
def test_png_size_reads_the_header_of_any_png(mode: str, options: dict) -> None:
    data = png_bytes(Image.new(mode, (37, 5)), **options)
    assert protocol.png_size(data) == (37, 5)
    assert protocol.png_size(protocol.encode_png(3, 2, bytes(24))) == (3, 2)


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (png_bytes(Image.new("RGB", (8, 8)), "JPEG"), "JPEG format, not PNG"),
        (png_bytes(Image.new("RGB", (8, 8)), "WEBP"), "WebP format, not PNG"),
        (b"%PDF-1.7 not an image", "not a PNG file (no PNG signature)"),
        (b"", "not a PNG file"),
        (protocol.PNG_SIGNATURE + b"\x00\x00", "ends before its header"),
        (protocol.PNG_SIGNATURE + b"\x00\x00\x00\x0dIEND" + bytes(17), "does not start with"),
        (with_corrupt_header(png_bytes(Image.new("L", (8, 8)))), "CRC mismatch"),
    ],
    ids=["jpeg", "webp", "pdf", "empty", "short", "no-ihdr", "bad-crc"],
)
def test_png_size_says_what_is_wrong(data: bytes, words: str) -> None:
    with pytest.raises(ValueError, match=re.escape(words)):
        protocol.png_size(data)


def test_a_zero_size_in_the_header_is_refused() -> None:
    body = struct.pack(">IIBBBBB", 0, 8, 8, 6, 0, 0, 0)
    ihdr = struct.pack(">I", 13) + b"IHDR" + body + struct.pack(">I", zlib.crc32(b"IHDR" + body))
    with pytest.raises(ValueError, match="invalid size 0x8"):
        protocol.png_size(protocol.PNG_SIGNATURE + ihdr)


@pytest.mark.parametrize(
    ("image", "words"),
    [
        (png_map(png_bytes(Image.new("1", (300, 20))), 8, 8), "the PNG is 300x20, declared 8x8"),
        (png_map(png_bytes(Image.new("1", (8, 8))), 64, 64), "64x64 is more than 1024 pixels"),
        ({**raw_image(np.zeros((33, 32, 3), np.uint8))}, "32x33 is more than 1024 pixels"),
        (png_map(png_bytes(Image.new("1", (8, 8)), "GIF"), 8, 8), "GIF format, not PNG"),
    ],
)
def test_from_dict_refuses_a_size_the_header_or_the_limits_deny(image: dict, words: str) -> None:
    limits = Limits(max_side=64, max_pixels=1024)
    with pytest.raises(ProtocolError, match=re.escape(words)) as refused:
        protocol.Image.from_dict(image, "mask_image", limits)
    assert (refused.value.code, refused.value.field) == ("bad_image", "mask_image")
    assert refused.value.message.startswith("mask_image: ")


# --- a real daemon ---------------------------------------------------------------------------


def peak_rss_bytes(daemon: DaemonProcess) -> int:
    assert daemon.process is not None
    status = Path(f"/proc/{daemon.process.pid}/status").read_text()
    line = next(line for line in status.splitlines() if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def test_a_huge_png_declared_small_is_refused_before_a_pixel_is_decoded(
    daemon: DaemonProcess, peer: Peer
) -> None:
    # 12000x12000 of zeros: 18 kB of PNG, 432 MB once decoded as RGB.
    huge = png_bytes(Image.new("1", (12000, 12000)))
    before = peak_rss_bytes(daemon)
    events = peer.generate(**JOB, init_image=png_map(huge, 8, 8))
    assert [e["event"] for e in events] == ["error"]
    assert (events[0]["code"], events[0]["field"]) == ("bad_image", "init_image")
    assert "the PNG is 12000x12000, declared 8x8" in events[0]["message"]
    assert peak_rss_bytes(daemon) - before < 100 * 2**20


FOREIGN = [(fmt, f"{fmt} format, not PNG") for fmt in ("BMP", "GIF", "TIFF", "ICO")]
FOREIGN.append(("WEBP", "WebP format, not PNG"))

HOSTILE: list[tuple[str, Callable[[], dict], str]] = [
    (
        "mask_image",
        lambda: png_map(png_bytes(Image.new("1", (9400, 9400))), 8, 8),
        "the PNG is 9400x9400, declared 8x8",
    ),
    ("init_image", lambda: png_map(png_bytes(Image.new("L", (16, 16))), 8, 8), "16x16, declared"),
    *(
        (
            "init_image",
            lambda fmt=fmt: png_map(png_bytes(Image.new("RGB", (8, 8)), fmt), 8, 8),
            words,
        )
        for fmt, words in FOREIGN
    ),
    # Valid headers over pixel data that ends early or is damaged.
    (
        "init_image",
        lambda: png_map(png_bytes(noisy(64, 64))[:6000], 64, 64),
        "the PNG does not decode",
    ),
    (
        "mask_image",
        lambda: png_map(png_bytes(noisy(64, 64))[:33], 64, 64),
        "does not open as a PNG (truncated or corrupt)",
    ),
    (
        "init_image",
        lambda: png_map(png_bytes(noisy(64, 64))[:100] + bytes(12000), 64, 64),
        "the PNG does not decode",
    ),
    (
        "init_image",
        lambda: png_map(with_corrupt_header(png_bytes(Image.new("L", (8, 8)))), 8, 8),
        "CRC mismatch",
    ),
]


@pytest.mark.parametrize(("field", "build", "words"), HOSTILE)
def test_each_hostile_png_gets_one_error_naming_its_field_and_no_accepted(
    peer: Peer, field: str, build: Callable[[], dict], words: str
) -> None:
    images = {"init_image": raw_image(np.zeros((64, 64, 3), np.uint8)), field: build()}
    size = {"width": images["init_image"]["width"], "height": images["init_image"]["height"]}
    events = peer.generate(**JOB, **size, **images)
    assert [e["event"] for e in events] == ["error"]
    assert (events[0]["code"], events[0]["field"]) == ("bad_image", field)
    assert words in events[0]["message"] and "object at 0x" not in events[0]["message"]


def test_png_images_of_any_pillow_mode_are_used_as_sent(peer: Peer) -> None:
    """An RGB init image and a 16-bit grey mask: outside the mask the init image comes back."""
    rng = np.random.default_rng(1)
    init = rng.integers(0, 256, (64, 64, 3), np.uint8)
    mask = np.zeros((64, 64), np.uint16)
    mask[16:48, 16:48] = 65535
    events = peer.generate(
        **JOB,
        width=64,
        height=64,
        init_image=png_map(png_bytes(Image.fromarray(init)), 64, 64),
        mask_image=png_map(png_bytes(Image.fromarray(mask)), 64, 64),
        strength=1.0,
    )
    assert events[-1]["event"] == "result", events[-1]
    result = pixels(events[-1]["images"][0])[..., :3]
    outside = mask == 0
    assert np.array_equal(result[outside], init[outside])
