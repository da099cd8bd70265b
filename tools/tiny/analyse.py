"""A deterministic pixel analyser for single-object scenes: what a generated image shows.

Background = the palette colour most border pixels are nearest to; the object = pixels far
from that colour (an opening removes night-sky stars and speckle; the largest blob is kept);
its colour = the palette colour most of its interior is nearest to; position = centroid;
size = bounding box extent; shape = how much of its bounding box and of its convex hull it fills.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from .scenes import BACKGROUNDS, OBJECT_COLOURS, SIZE, Obj, Scene

ATTRIBUTES = ("colour", "background", "position", "shape", "size")
OBJECT_DISTANCE = 60.0  # RGB distance from the background that counts as object
CENTER_BOX = 16  # centroid within this many pixels of the middle on both axes = "center"
# Bounding-box extent splitting small (26-38 px on ground truth) from large (48-64 px).
LARGE_EXTENT = 43


@dataclass(frozen=True)
class Analysis:
    background: str
    colour: str | None = None
    position: str | None = None
    size: str | None = None
    shape: str | None = None


def _nearest(pixels: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> np.ndarray:
    colours = np.array(list(palette.values()), dtype=np.float32)
    return np.argmin(((pixels[:, None, :] - colours[None]) ** 2).sum(-1), axis=1)


def _shift_all(mask: np.ndarray, combine: str) -> np.ndarray:
    """3x3 erosion ("all") or dilation ("any"), treating outside the image as background."""
    padded = np.pad(mask, 1)
    views = [
        padded[1 + dy : SIZE + 1 + dy, 1 + dx : SIZE + 1 + dx]
        for dy in (-1, 0, 1)
        for dx in (-1, 0, 1)
    ]
    return np.all(views, axis=0) if combine == "all" else np.any(views, axis=0)


def _largest_blob(mask: np.ndarray) -> np.ndarray:
    seen = np.zeros_like(mask)
    best: list[tuple[int, int]] = []
    for start in zip(*np.nonzero(mask), strict=True):
        if seen[start]:
            continue
        seen[start] = True
        blob, queue = [], deque([start])
        while queue:
            y, x = queue.popleft()
            blob.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < SIZE and 0 <= nx < SIZE and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        if len(blob) > len(best):
            best = blob
    out = np.zeros_like(mask)
    if best:
        ys, xs = zip(*best, strict=True)
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


def analyse(image: np.ndarray) -> Analysis:
    """Read the attributes of the one object in an RGB uint8 SIZE x SIZE image."""
    pixels = image.astype(np.float32)
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
    background = list(BACKGROUNDS)[winner]
    bg_colour = np.median(border[labels == winner], axis=0)

    far = np.linalg.norm(pixels - bg_colour, axis=-1) > OBJECT_DISTANCE
    mask = _largest_blob(_shift_all(_shift_all(far, "all"), "any"))
    if mask.sum() < 20:
        return Analysis(background)
    # Edges blend into the background; the interior carries the object's own colour.
    interior = _shift_all(mask, "all")
    core = pixels[interior if interior.sum() >= 10 else mask]
    colour = list(OBJECT_COLOURS)[int(np.bincount(_nearest(core, OBJECT_COLOURS)).argmax())]

    ys, xs = np.nonzero(mask)
    cy, cx = ys.mean() - SIZE / 2, xs.mean() - SIZE / 2
    if max(abs(cx), abs(cy)) < CENTER_BOX:
        position = "center"
    else:
        position = f"{'top' if cy < 0 else 'bottom'} {'left' if cx < 0 else 'right'}"
    extent = max(ys.max() - ys.min(), xs.max() - xs.min()) + 1
    size = "large" if extent > LARGE_EXTENT else "small"
    return Analysis(background, colour, position, size, classify_shape(mask))


def score(analysis: Analysis, scene: Scene) -> dict[str, bool]:
    """Which attributes of a single-object scene the analysis got right."""
    obj: Obj = scene.objects[0]
    return {
        "colour": analysis.colour == obj.colour,
        "background": analysis.background == scene.background,
        "position": analysis.position == obj.position,
        "shape": analysis.shape == obj.shape,
        "size": analysis.size == obj.size,
    }
