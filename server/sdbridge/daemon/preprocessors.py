"""Preprocessors: what the daemon makes of a control layer's pixels before a ControlNet sees them.

ControlNets read white marks on black: scribble and Canny edge models were trained so. A layer
as an editor sends it is RGBA: strokes on a transparent layer, or dark lines on a light canvas.
"""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np
from PIL import Image

# Canny's hysteresis thresholds as the A1111 ControlNet extension defaults them.
CANNY_LOW, CANNY_HIGH = 100, 200


def flattened(layer: Image.Image) -> Image.Image:
    """The layer over black: a transparent pixel is no mark."""
    rgba = layer.convert("RGBA")
    black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
    return Image.alpha_composite(black, rgba).convert("RGB")


def scribble(layer: Image.Image) -> Image.Image:
    """White where the artist drew, black elsewhere.

    On a layer with transparency the opaque pixels are the marks; on an opaque one the marks are
    what stands out from the paper: dark on a light canvas, light on a dark one.
    """
    rgba = np.asarray(layer.convert("RGBA"))
    alpha = rgba[..., 3]
    if alpha.min() < 255:
        marks = alpha >= 128
    else:
        luminance = np.asarray(layer.convert("L"), dtype=np.float64)
        marks = np.abs(luminance - np.median(luminance)) >= 64
    return Image.fromarray(np.where(marks, 255, 0).astype(np.uint8)).convert("RGB")


def canny(layer: Image.Image) -> Image.Image:
    gray = np.asarray(flattened(layer).convert("L"))
    return Image.fromarray(cv2.Canny(gray, CANNY_LOW, CANNY_HIGH)).convert("RGB")


# By the names the protocol lists (wire.protocol.PREPROCESSORS).
PREPROCESSORS: dict[str, Callable[[Image.Image], Image.Image]] = {
    "none": flattened,
    "scribble": scribble,
    "canny": canny,
}
