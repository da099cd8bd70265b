"""Editor-side rules shared by the Krita and GIMP plugins: which region a job covers, how the
editor's pixels and selection become the job's images, and where and how the result lands.

Pure standard library (it runs inside Krita's Python 3.10/3.11 and GIMP's 3.13, which have no
numpy): pixel work uses bytes slicing, which copies in C, never a Python loop per pixel.

Conventions: pixel buffers are 8-bit, rows top to bottom, no padding between rows. Krita hands
out BGRA, GIMP and the wire use RGBA. A mask is one byte per pixel, 255 = selected/repaint.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Extent:
    width: int
    height: int

    @property
    def pixel_count(self) -> int:
        return self.width * self.height

    @property
    def is_empty(self) -> bool:
        return self.width <= 0 or self.height <= 0


@dataclass(frozen=True)
class Bounds:
    x: int
    y: int
    width: int
    height: int

    @staticmethod
    def of(extent: Extent) -> Bounds:
        return Bounds(0, 0, extent.width, extent.height)

    @staticmethod
    def from_corners(x1: int, y1: int, x2: int, y2: int) -> Bounds:
        """GIMP reports selection bounds as two corners (x2, y2 exclusive)."""
        return Bounds(x1, y1, x2 - x1, y2 - y1)

    @property
    def extent(self) -> Extent:
        return Extent(self.width, self.height)

    @property
    def offset(self) -> tuple[int, int]:
        return (self.x, self.y)

    @property
    def right(self) -> int:
        return self.x + self.width

    @property
    def bottom(self) -> int:
        return self.y + self.height

    @property
    def is_empty(self) -> bool:
        return self.width <= 0 or self.height <= 0

    def pad(self, amount: int) -> Bounds:
        return Bounds(
            self.x - amount, self.y - amount, self.width + 2 * amount, self.height + 2 * amount
        )

    def intersect(self, other: Bounds) -> Bounds:
        """The common part; an empty Bounds (width or height 0) when they do not overlap."""
        x, y = max(self.x, other.x), max(self.y, other.y)
        right, bottom = min(self.right, other.right), min(self.bottom, other.bottom)
        return Bounds(x, y, max(0, right - x), max(0, bottom - y))

    def clamp(self, canvas: Extent) -> Bounds:
        return self.intersect(Bounds.of(canvas))

    def contains(self, other: Bounds) -> bool:
        return (
            self.x <= other.x
            and self.y <= other.y
            and other.right <= self.right
            and other.bottom <= self.bottom
        )


class SelectionOutsideCanvas(ValueError):
    """The selection does not overlap the canvas, so there is nothing to paint."""


def job_bounds(
    canvas: Extent,
    selection: Bounds | None,
    context: float = 0.25,
    min_padding: int = 16,
) -> Bounds:
    """The region sent to the daemon.

    Without a selection: the whole canvas. With one: its bounds grown on every side by
    `context` times its larger side (at least `min_padding` px) so the model sees what
    surrounds the area it repaints and the result blends in, clamped to the canvas.
    """
    if selection is None:
        return Bounds.of(canvas)
    inside = selection.clamp(canvas)
    if inside.is_empty:
        raise SelectionOutsideCanvas("the selection is outside the canvas")
    padding = max(min_padding, round(max(inside.width, inside.height) * context))
    return inside.pad(padding).clamp(canvas)


def _swap_red_blue(pixels: bytes | bytearray) -> bytearray:
    out = bytearray(pixels)
    out[0::4] = pixels[2::4]
    out[2::4] = pixels[0::4]
    return out


def bgra_to_rgba(pixels: bytes | bytearray) -> bytearray:
    """Krita's pixelData (8-bit RGBA documents) is BGRA; the wire wants RGBA."""
    return _swap_red_blue(pixels)


def rgba_to_bgra(pixels: bytes | bytearray) -> bytearray:
    """For Krita's setPixelData."""
    return _swap_red_blue(pixels)


def copy_region(
    pixels: bytes | bytearray, source: Bounds, target: Bounds, bytes_per_pixel: int
) -> bytearray:
    """`pixels` covers `source` (canvas coordinates); returns a buffer covering `target` with
    the overlapping part copied and zeros (transparent / not selected) elsewhere."""
    expected = source.width * source.height * bytes_per_pixel
    if len(pixels) != expected:
        raise ValueError(f"pixel buffer has {len(pixels)} bytes, {source} needs {expected}")
    out = bytearray(target.width * target.height * bytes_per_pixel)
    common = source.intersect(target)
    if common.is_empty:
        return out
    row = common.width * bytes_per_pixel
    src_stride, dst_stride = source.width * bytes_per_pixel, target.width * bytes_per_pixel
    src = (common.y - source.y) * src_stride + (common.x - source.x) * bytes_per_pixel
    dst = (common.y - target.y) * dst_stride + (common.x - target.x) * bytes_per_pixel
    for _ in range(common.height):
        out[dst : dst + row] = pixels[src : src + row]
        src += src_stride
        dst += dst_stride
    return out


def mask_to_rgba(mask: bytes | bytearray) -> bytearray:
    """A one-byte mask as an opaque grey RGBA image, the wire's image format."""
    out = bytearray(len(mask) * 4)
    out[0::4] = mask
    out[1::4] = mask
    out[2::4] = mask
    out[3::4] = b"\xff" * len(mask)
    return out


def with_alpha(rgba: bytes | bytearray, alpha: bytes | bytearray) -> bytearray:
    """Replaces the alpha channel: results from the daemon are opaque, so using the selection
    mask as alpha makes exactly the selected pixels (softly, for feathered selections) change."""
    if len(rgba) != len(alpha) * 4:
        raise ValueError(f"{len(rgba)} bytes of RGBA do not match a mask of {len(alpha)} pixels")
    out = bytearray(rgba)
    out[3::4] = alpha
    return out


def image_map(extent: Extent, rgba: bytes | bytearray) -> dict[str, Any]:
    """An image as protocol.md sends it: raw RGBA8."""
    if len(rgba) != extent.pixel_count * 4:
        raise ValueError(f"{len(rgba)} bytes of RGBA do not fill {extent.width}x{extent.height}")
    return {"width": extent.width, "height": extent.height, "format": "raw", "data": bytes(rgba)}


@dataclass(frozen=True)
class JobPlan:
    """Everything the plugin must remember between sending a job and placing its result."""

    bounds: Bounds  # region sent to the daemon, canvas coordinates
    target: Bounds  # where the result lands: the selection's bounds, or `bounds`
    mask: bytes | None  # the selection, one byte per pixel over `bounds`; None: everything
    # True: the daemon repaints the masked part of the canvas (inpainting). False: it paints
    # the whole area afresh and the mask only cuts the result to the selection's shape.
    inpaint: bool = True

    @property
    def inpaints(self) -> bool:
        return self.inpaint and self.mask is not None

    def needs_canvas(self, strength: float) -> bool:
        """Whether the job sends the canvas's pixels: to repaint them (strength < 1), or as
        the surroundings of an inpainted selection."""
        return strength < 1.0 or self.inpaints


def plan_job(
    canvas: Extent,
    selection: Bounds | None,
    selection_mask: bytes | bytearray | None = None,
) -> JobPlan:
    """`selection_mask` is one byte per pixel covering `selection` (any covering region is
    cropped to the job); without it a rectangular selection is assumed."""
    bounds = job_bounds(canvas, selection)
    if selection is None:
        return JobPlan(bounds, bounds, None)
    target = selection.clamp(canvas)
    if selection_mask is None:
        selection_mask = b"\xff" * (selection.width * selection.height)
    return JobPlan(bounds, target, bytes(copy_region(selection_mask, selection, bounds, 1)))


def plan_area(
    canvas: Extent, selection: Bounds | None, selection_mask: bytes | bytearray | None = None
) -> JobPlan:
    """A job that paints a whole new picture of exactly the selection's bounds (or the canvas):
    GIMP's "Generate" puts it on a layer of its own, the size of that area, opaque where the
    selection is (softly at a feathered edge) and transparent elsewhere."""
    bounds = Bounds.of(canvas) if selection is None else selection.clamp(canvas)
    if bounds.is_empty:
        raise SelectionOutsideCanvas("the selection is outside the canvas")
    mask = None
    if selection is not None and selection_mask is not None:
        mask = bytes(copy_region(selection_mask, selection, bounds, 1))
        if mask.count(255) == len(mask):
            mask = None  # a rectangle: the whole area, no cut needed
    return JobPlan(bounds, bounds, mask, inpaint=False)


_INVERT = bytes(255 - value for value in range(256))


def transparent_bounds(alpha: bytes | bytearray, extent: Extent) -> Bounds | None:
    """The bounds of the pixels that are not fully opaque (alpha < 255); None if there are
    none. One scan per row in C (`strip`), no Python loop per pixel."""
    top = bottom = left = right = None
    width = extent.width
    for y in range(extent.height):
        row = bytes(alpha[y * width : (y + 1) * width])
        if row.count(255) == width:
            continue
        first = width - len(row.lstrip(b"\xff"))
        last = len(row.rstrip(b"\xff"))
        top = y if top is None else top
        bottom = y + 1
        left = first if left is None else min(left, first)
        right = last if right is None else max(right, last)
    if top is None:
        return None
    return Bounds(left, top, right - left, bottom - top)


def plan_expand(canvas: Extent, alpha: bytes | bytearray) -> JobPlan | None:
    """Expand (outpaint): the transparent parts of the canvas (after Image > Canvas Size, say)
    are painted and the opaque ones kept exactly. The mask is the transparency (255 - alpha)
    over its bounds plus context, as for a selection. None when no pixel is transparent, or
    every pixel is (then there is nothing to extend: a plain job paints the canvas)."""
    if len(alpha) != canvas.pixel_count:
        raise ValueError(f"{len(alpha)} alpha bytes do not cover {canvas.width}x{canvas.height}")
    if alpha.count(0) == len(alpha):
        return None
    hole = transparent_bounds(alpha, canvas)
    if hole is None:
        return None
    bounds = job_bounds(canvas, hole)
    mask = bytes(copy_region(alpha, Bounds.of(canvas), bounds, 1)).translate(_INVERT)
    return JobPlan(bounds, hole, mask)


def fill_transparent(rgba: bytes | bytearray, extent: Extent) -> bytearray:
    """An expand job's init image: every row's transparent margins take its outermost opaque
    pixel, and rows without one take the nearest row that has one, all made opaque. The daemon
    blends the new paint into the init image at the mask's edge, so it meets the picture's own
    colours there rather than the white that transparency is read as."""
    stride = extent.width * 4
    out = bytearray(rgba)
    rows_with_paint = []
    for y in range(extent.height):
        start = y * stride
        alpha = bytes(out[start + 3 : start + stride : 4])
        first, last = alpha.find(255), alpha.rfind(255)
        if first < 0:
            continue
        left = out[start + first * 4 : start + first * 4 + 4]
        right = out[start + last * 4 : start + last * 4 + 4]
        out[start : start + first * 4] = left * first
        out[start + last * 4 + 4 : start + stride] = right * (extent.width - last - 1)
        rows_with_paint.append(y)
    for y in range(extent.height) if rows_with_paint else ():
        index = bisect.bisect_left(rows_with_paint, y)
        if index < len(rows_with_paint) and rows_with_paint[index] == y:
            continue
        around = rows_with_paint[max(0, index - 1) : index + 1]
        nearest = min(around, key=lambda row, y=y: abs(row - y))
        out[y * stride : (y + 1) * stride] = out[nearest * stride : (nearest + 1) * stride]
    out[3::4] = b"\xff" * extent.pixel_count
    return out


@dataclass(frozen=True)
class Placement:
    bounds: Bounds  # canvas coordinates of the new layer's pixels
    rgba: bytearray


def place_result(image: dict[str, Any], plan: JobPlan) -> Placement:
    """A raw result image (covering `plan.bounds`) as the pixels of a new layer: cut to the
    selection's bounds, transparent where the selection was not."""
    if image.get("format") != "raw":
        raise ValueError(f"expected a raw image, got {image.get('format')!r}")
    if (image["width"], image["height"]) != (plan.bounds.width, plan.bounds.height):
        raise ValueError(
            f"result is {image['width']}x{image['height']}, "
            f"the job was {plan.bounds.width}x{plan.bounds.height}"
        )
    rgba: bytes | bytearray = image["data"]
    if plan.mask is not None:
        rgba = with_alpha(rgba, plan.mask)
    return Placement(plan.target, copy_region(rgba, plan.bounds, plan.target, 4))


def layer_name(prompt: str, seed: int, max_chars: int = 40) -> str:
    """`prompt (seed)`, the prompt shortened to one line so the layer list stays readable."""
    text = re.sub(r"\s+", " ", prompt).strip() or "sdbridge"
    if len(text) > max_chars:
        text = text[: max_chars - 1].rstrip() + "…"
    return f"{text} ({seed})"
