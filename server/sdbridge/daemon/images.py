"""Request images as the daemon decodes them, and how much memory a job may use.

`protocol.Image.from_dict` has read each PNG's header: a PNG of its declared size, within the
limits. `check_images` decodes every pixel before the job is accepted, so that bytes which do not
decode are refused with one `error` and no `accepted`, not after the job started. The job
decodes them again (`decode_image`): a queued job holds only the compressed bytes, and a decode
costs milliseconds to a fraction of a second against the seconds of a job.
"""

from __future__ import annotations

import io

import psutil  # a dependency of accelerate
import torch
from PIL import Image, UnidentifiedImageError

from ..wire import protocol
from ..wire.protocol import ErrorCode, GenerateRequest, ProtocolError


def decode_image(image: protocol.Image, mode: str, field: str | None = None) -> Image.Image:
    """`image` as RGB (transparency painted over white), as RGBA (a control layer, whose
    transparency is meaningful) or, for a mask, L (its first channel).

    Bytes that do not decode are a BAD_IMAGE error naming `field`.
    """
    if image.format == "png":
        decoded = _decode_png(image, field or "image")
    else:
        decoded = Image.frombytes("RGBA", (image.width, image.height), image.data)
    if mode == "L":
        # Other modes (16-bit, 1-bit, paletted) have no first channel of 0..255 to read.
        return (
            decoded.getchannel(0) if decoded.mode in ("RGB", "RGBA", "LA") else decoded.convert("L")
        )
    if mode == "RGBA":
        return decoded.convert("RGBA")
    if decoded.mode in ("RGBA", "LA", "P"):
        # Transparent canvas areas are painted as white paper, not as their hidden colour.
        decoded = decoded.convert("RGBA")
        paper = Image.new("RGBA", decoded.size, (255, 255, 255, 255))
        decoded = Image.alpha_composite(paper, decoded)
    return decoded.convert("RGB")


def _decode_png(image: protocol.Image, field: str) -> Image.Image:
    def bad(reason: str) -> ProtocolError:
        return ProtocolError(ErrorCode.BAD_IMAGE, f"{field}: {reason}", field)

    try:
        # Only PNG: Pillow would otherwise open any of its formats that the bytes happen to be.
        png = Image.open(io.BytesIO(image.data), formats=["PNG"])
    except UnidentifiedImageError as exc:  # its text shows the BytesIO object
        raise bad("the data does not open as a PNG (truncated or corrupt)") from exc
    except Exception as exc:  # Pillow's own bomb cap and whatever bad bytes make its parser raise
        raise bad(f"the PNG does not open: {exc}") from exc
    # The decompression cap, as an error and before load() allocates what the header says:
    # from_dict bounded the declared size by the limits (Pillow's own MAX_IMAGE_PIXELS, far
    # higher, only warns below twice its value).
    if png.size != (image.width, image.height):
        raise bad(f"the PNG is {png.width}x{png.height}, declared {image.width}x{image.height}")
    try:
        png.load()
    except Exception as exc:  # truncated or corrupt data: OSError, SyntaxError, ValueError...
        raise bad(f"the PNG does not decode: {exc}") from exc
    return png


def check_images(request: GenerateRequest) -> None:
    """Decode the request's PNGs as its job will; raises BAD_IMAGE naming the field if one fails.

    The daemon calls it before `accepted`. Raw images need no check: from_dict checked their size.
    """
    for field, image, mode in (
        ("init_image", request.init_image, "RGB"),
        ("mask_image", request.mask_image, "L"),
        *(("control", control.image, "RGBA") for control in request.control),
    ):
        if image is not None and image.format == "png":
            decode_image(image, mode, field)


def job_memory_bytes(device: torch.device) -> int:
    """The memory a job on `device` runs in: a CUDA device's own, else the machine's RAM (CPU,
    and Apple's MPS, which shares it).

    For `protocol.Limits.for_memory`, which turns it into max_pixels and max_message_bytes.
    """
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return psutil.virtual_memory().total
