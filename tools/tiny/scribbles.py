"""Control images for the embedded ControlNet: what an artist might draw where an object goes.

White marks on black, as the daemon's `scribble` preprocessor makes them of a control layer:
the object's silhouette grown or shrunk and roughened (a filled blob), its rough outline, or a
few strokes across it. Jitter everywhere, so that a hand-drawn shape is within what was seen.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .scenes import BACKGROUNDS, Scene, render

STAR_DOT = (235, 235, 210)  # the night sky's stars (scenes.render): not an object
KINDS = ("blob", "outline", "strokes")


def silhouette(scene: Scene, image: np.ndarray | None = None) -> np.ndarray:
    """Where the scene's objects are, as a bool HxW mask."""
    image = render(scene) if image is None else image
    background = np.array(BACKGROUNDS[scene.background], dtype=np.uint8)
    return np.any(image != background, axis=-1) & np.any(image != STAR_DOT, axis=-1)


def _rough(mask: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """The mask grown or shrunk by a few pixels, its edge wobbling as a hand's would."""
    unit = min(mask.shape) / 128
    shape = Image.fromarray(np.where(mask, 255, 0).astype(np.uint8))
    grow = int(rng.integers(-2, 5) * unit)
    if grow:
        size = 2 * abs(grow) + 1
        shape = shape.filter(
            ImageFilter.MaxFilter(size) if grow > 0 else ImageFilter.MinFilter(size)
        )
    # Low-frequency noise added before thresholding a blurred copy makes the edge wobble.
    noise = rng.normal(0, 60, (max(2, mask.shape[0] // 16), max(2, mask.shape[1] // 16)))
    wobble = np.asarray(
        Image.fromarray(noise.astype(np.float32), "F").resize(shape.size, Image.BICUBIC)
    )
    blurred = np.asarray(shape.filter(ImageFilter.GaussianBlur(3 * unit)), dtype=np.float32)
    near = blurred > 8  # the wobble moves the edge, it draws no marks of its own elsewhere
    return Image.fromarray(np.where(near & (blurred + wobble > 128), 255, 0).astype(np.uint8))


def scribble(mask: np.ndarray, rng: np.random.Generator, kind: str | None = None) -> np.ndarray:
    """A control image (uint8 HxW, 255 = mark) for an object where `mask` is, of a random kind
    unless `kind` names one."""
    kind = kind or str(rng.choice(KINDS))
    unit = min(mask.shape) / 128
    blob = _rough(mask, rng)
    if kind == "blob":
        return np.asarray(blob)
    if kind == "outline":
        width = max(1, int(rng.integers(2, 5) * unit))
        edge = blob.filter(ImageFilter.FIND_EDGES).filter(
            ImageFilter.MaxFilter(2 * (width // 2) + 1)
        )
        return np.where(np.asarray(edge) > 0, 255, 0).astype(np.uint8)
    # Strokes: a few lines between points inside the shape, like quick hatching.
    inside = np.argwhere(np.asarray(blob) > 0)
    canvas = Image.new("L", (mask.shape[1], mask.shape[0]), 0)
    if len(inside) == 0:
        return np.asarray(canvas)
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(4, 9))):
        (y0, x0), (y1, x1) = inside[rng.integers(len(inside), size=2)]
        draw.line((int(x0), int(y0), int(x1), int(y1)), fill=255, width=max(2, int(3 * unit)))
    return np.asarray(canvas)
