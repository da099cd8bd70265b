"""Generation sizes: each family paints well only near the size it was trained at.

A canvas or selection far from it is generated at a size inside the family's range (or the one
the model's folder declares) with the same aspect ratio and scaled to the target, so a small
selection is not painted at 96x96 and a 4000 px canvas does not run out of memory. A large
target may get a second pass: the first image upscaled, then repainted with img2img at a low
strength (A1111's "hires fix").
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from .models import SD1, SD2, SDXL


@dataclass(frozen=True)
class SizeRange:
    """Sides (of a square of the same area) from `low` to `high`, in steps of `multiple`."""

    low: int
    high: int
    multiple: int = 8

    def fit(self, width: int, height: int) -> tuple[int, int]:
        """The target's aspect ratio at an area inside the range."""
        area = width * height
        low, high = self.low**2, self.high**2
        scale = (
            math.sqrt(low / area) if area < low else math.sqrt(high / area) if area > high else 1
        )
        return self.round(width * scale, height * scale)

    def round(self, width: float, height: float) -> tuple[int, int]:
        step = self.multiple
        return (max(step, round(width / step) * step), max(step, round(height / step) * step))


# (low, high) as factors of the model's own native side (UNet sample size x VAE factor), so that
# SD 1.5 (512) gets 512-768, an SD 2 768-v model 768-960 and SDXL (1024) 768-1280. SDXL was
# trained on buckets in multiples of 64. A folder's sdbridge.json may say otherwise (the embedded
# model: 128x128's area only, see declared_range).
FAMILY_RANGES: dict[str, tuple[float, float, int]] = {
    SD1: (1.0, 1.5, 8),
    SD2: (1.0, 1.25, 8),
    SDXL: (0.75, 1.25, 64),
}
# Transformer families (SD 3, Flux, ...) patchify the latent in 2x2: multiples of 16.
OTHER_RANGE = (0.75, 1.25, 16)
# A second pass paints at most at twice the first pass's side: beyond that it needs the memory
# the first pass avoided; the rest of the way to the target is plain scaling. Below 1.25x the
# first image scales well enough and the pass would mostly repaint it at the same size.
REFINE_MAX_FACTOR = 2.0
REFINE_MIN_FACTOR = 1.25


def size_range(family: str, native: int, model_path: str = "") -> SizeRange:
    """The family's range, unless the model's folder declares the sizes its training covered."""
    declared = declared_range(model_path)
    if declared is not None:
        return declared
    low, high, multiple = FAMILY_RANGES.get(family, OTHER_RANGE)
    return SizeRange(round(native * low), round(native * high), multiple)


def declared_range(model_path: str) -> SizeRange | None:
    """The "sizes" of a model folder's sdbridge.json ({"low", "high", "multiple"}), as the
    embedded model writes them: it was trained on aspect buckets at one area, not at the
    family's range. None when the folder declares none or declares it badly."""
    info = Path(model_path) / "sdbridge.json" if model_path else None
    if info is None or not info.is_file():
        return None
    try:
        sizes = json.loads(info.read_text()).get("sizes")
        low, high, multiple = (int(sizes[key]) for key in ("low", "high", "multiple"))
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None
    if not 8 <= low <= high or multiple < 1:
        return None
    return SizeRange(low, high, multiple)


def refine_size(
    first: tuple[int, int], target: tuple[int, int], sizes: SizeRange
) -> tuple[int, int] | None:
    """The size of a second pass towards `target`, or None when the first pass is near enough."""
    factor = min(REFINE_MAX_FACTOR, max(target[0] / first[0], target[1] / first[1]))
    if factor < REFINE_MIN_FACTOR:
        return None
    return sizes.round(first[0] * factor, first[1] * factor)
