"""A deterministic pixel analyser for single-object scenes: what a generated image shows.

Background = the palette colour most border pixels are nearest to; the object = pixels far from
that colour (an opening removes night-sky stars and speckle; the largest blob is kept); its
colour = the palette colour most of its interior is nearest to; position = centroid; size =
bounding box extent; shape = how much of its bounding box and of its convex hull it fills; count
= the blobs of at least 6% of the largest one's area (a second copy of the object, even a
smaller one, counts; a small star beside a large square has about a tenth of its area). Any
image size: position and size are read relative to the image (the middle eighth on both axes is
"center"; large is over a third of the shorter side).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from .scenes import BACKGROUNDS, OBJECT_COLOURS, SIZE, Obj, Scene

ATTRIBUTES = ("colour", "background", "position", "shape", "size", "count")
OBJECT_DISTANCE = 60.0  # RGB distance from the background that counts as object
# Centroid within this share of the side from the middle on both axes = "center" (16 px at 128).
CENTER_BOX = 16 / SIZE
# Bounding-box extent over the shorter side splitting small (26-38 px of 128 on ground truth)
# from large (48-64 px).
LARGE_EXTENT = 43 / SIZE
# A blob counts as an object from this share of the largest blob's area (and MIN_BLOB pixels):
# on ground-truth two-object scenes at every bucket a fifth missed 11% of the small objects
# beside a large one, 6% misses only objects drawn touching each other.
COUNT_SHARE = 0.06
MIN_BLOB = 20


@dataclass(frozen=True)
class Analysis:
    background: str
    colour: str | None = None
    position: str | None = None
    size: str | None = None
    shape: str | None = None
    count: int = 0


def _nearest(pixels: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> np.ndarray:
    colours = np.array(list(palette.values()), dtype=np.float32)
    return np.argmin(((pixels[:, None, :] - colours[None]) ** 2).sum(-1), axis=1)


def _shift_all(mask: np.ndarray, combine: str) -> np.ndarray:
    """3x3 erosion ("all") or dilation ("any"), treating outside the image as background."""
    padded = np.pad(mask, 1)
    height, width = mask.shape
    views = [
        padded[1 + dy : height + 1 + dy, 1 + dx : width + 1 + dx]
        for dy in (-1, 0, 1)
        for dx in (-1, 0, 1)
    ]
    return np.all(views, axis=0) if combine == "all" else np.any(views, axis=0)


def _blobs(mask: np.ndarray) -> list[list[tuple[int, int]]]:
    """The 4-connected blobs of a mask, largest first."""
    height, width = mask.shape
    seen = np.zeros_like(mask)
    blobs: list[list[tuple[int, int]]] = []
    for start in zip(*np.nonzero(mask), strict=True):
        if seen[start]:
            continue
        seen[start] = True
        blob, queue = [], deque([start])
        while queue:
            y, x = queue.popleft()
            blob.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        blobs.append(blob)
    return sorted(blobs, key=len, reverse=True)


def _mask_of(blob: list[tuple[int, int]], shape: tuple[int, ...]) -> np.ndarray:
    out = np.zeros(shape[:2], bool)
    ys, xs = zip(*blob, strict=True)
    out[list(ys), list(xs)] = True
    return out


def _hull_area(points: np.ndarray) -> float:
    """Area of the convex hull of pixel squares (monotone chain on their corners)."""
    corners = np.unique(
        np.concatenate([points + d for d in ((0, 0), (0, 1), (1, 0), (1, 1))]), axis=0
    )
    pts = sorted(map(tuple, corners.tolist()))

    def half(seq: list[tuple[int, int]]) -> list[tuple[int, int]]:
        chain: list[tuple[int, int]] = []
        for p in seq:
            while len(chain) >= 2:
                (ax, ay), (bx, by) = chain[-2], chain[-1]
                if (bx - ax) * (p[1] - ay) - (by - ay) * (p[0] - ax) > 0:
                    break
                chain.pop()
            chain.append(p)
        return chain

    hull = half(pts)[:-1] + half(pts[::-1])[:-1]
    xs, ys = np.array(hull, dtype=np.float64).T
    return 0.5 * abs(float(np.dot(xs, np.roll(ys, 1)) - np.dot(ys, np.roll(xs, 1))))


def classify_shape(mask: np.ndarray) -> str:
    ys, xs = np.nonzero(mask)
    area = float(len(ys))
    box = float((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
    solidity = area / _hull_area(np.stack([ys, xs], axis=1))
    fill = area / box
    # Ground truth: star solidity ~0.5, others ~1; fill square 1.0, circle 0.79, triangle 0.5.
    if solidity < 0.75:
        return "star"
    if fill > 0.88:
        return "square"
    return "circle" if fill > 0.64 else "triangle"


def objects_mask(image: np.ndarray) -> np.ndarray:
    """Where an RGB uint8 image shows objects: pixels far from its background, stars removed."""
    pixels = image.astype(np.float32)
    return _far_from(pixels, _background(pixels)[1])


def _far_from(pixels: np.ndarray, bg_colour: np.ndarray) -> np.ndarray:
    far = np.linalg.norm(pixels - bg_colour, axis=-1) > OBJECT_DISTANCE
    return _shift_all(_shift_all(far, "all"), "any")


def _background(pixels: np.ndarray) -> tuple[str, np.ndarray]:
    """The palette background most border pixels are nearest to, and their median colour."""
    border = np.concatenate(
        [
            pixels[:2].reshape(-1, 3),
            pixels[-2:].reshape(-1, 3),
            pixels[:, :2].reshape(-1, 3),
            pixels[:, -2:].reshape(-1, 3),
        ]
    )
    labels = _nearest(border, BACKGROUNDS)
    winner = int(np.bincount(labels, minlength=len(BACKGROUNDS)).argmax())
    return list(BACKGROUNDS)[winner], np.median(border[labels == winner], axis=0)


def analyse(image: np.ndarray) -> Analysis:
    """Read the attributes of the (largest) object in an RGB uint8 image, and count them."""
    pixels = image.astype(np.float32)
    background, bg_colour = _background(pixels)
    blobs = _blobs(_far_from(pixels, bg_colour))
    if not blobs or len(blobs[0]) < MIN_BLOB:
        return Analysis(background)
    least = max(MIN_BLOB, COUNT_SHARE * len(blobs[0]))
    count = sum(1 for blob in blobs if len(blob) >= least)
    mask = _mask_of(blobs[0], image.shape)
    # Edges blend into the background; the interior carries the object's own colour.
    interior = _shift_all(mask, "all")
    core = pixels[interior if interior.sum() >= 10 else mask]
    colour = list(OBJECT_COLOURS)[int(np.bincount(_nearest(core, OBJECT_COLOURS)).argmax())]

    height, width = mask.shape
    ys, xs = np.nonzero(mask)
    cy, cx = ys.mean() / height - 0.5, xs.mean() / width - 0.5
    if max(abs(cx), abs(cy)) < CENTER_BOX:
        position = "center"
    else:
        position = f"{'top' if cy < 0 else 'bottom'} {'left' if cx < 0 else 'right'}"
    extent = (max(ys.max() - ys.min(), xs.max() - xs.min()) + 1) / min(height, width)
    size = "large" if extent > LARGE_EXTENT else "small"
    return Analysis(background, colour, position, size, classify_shape(mask), count)


def score(analysis: Analysis, scene: Scene) -> dict[str, bool]:
    """Which attributes of a single-object scene the analysis got right."""
    obj: Obj = scene.objects[0]
    return {
        "colour": analysis.colour == obj.colour,
        "background": analysis.background == scene.background,
        "position": analysis.position == obj.position,
        "shape": analysis.shape == obj.shape,
        "size": analysis.size == obj.size,
        "count": analysis.count == len(scene.objects),
    }
