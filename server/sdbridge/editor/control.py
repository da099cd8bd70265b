"""Control layers as a front-end keeps them: which ControlNet reads a layer, and how strongly.

The artist goes on painting the layer, so a choice holds no pixels: `entry` pairs it with the
layer's pixels when a job is made (the protocol's `control` entry, docs/protocol.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..wire.protocol import PREPROCESSORS


@dataclass(frozen=True)
class ControlChoice:
    model: str  # a name from the daemon's `controlnets`
    preprocessor: str = "none"
    strength: float = 1.0
    start: float = 0.0
    end: float = 1.0

    def entry(self, image: Mapping[str, Any]) -> dict[str, Any]:
        """The `control` entry of this choice over `image`, a wire image map."""
        return {
            "image": dict(image),
            "model": self.model,
            "preprocessor": self.preprocessor,
            "strength": self.strength,
            "start": self.start,
            "end": self.end,
        }


def parse_control(spec: str) -> tuple[ControlChoice, str]:
    """`MODEL,IMAGE[,PREPROCESSOR[,STRENGTH[,START,END]]]` (the CLI's `--control`): the choice
    and the control image's path. ValueError says what is wrong."""
    parts = [part.strip() for part in spec.split(",")]
    if len(parts) not in (2, 3, 4, 6) or not all(parts):
        raise ValueError(
            f"--control {spec!r}: give MODEL,IMAGE[,PREPROCESSOR[,STRENGTH[,START,END]]]"
        )
    model, path, *rest = parts
    preprocessor = rest[0] if rest else "none"
    if preprocessor not in PREPROCESSORS:
        raise ValueError(
            f"--control {spec!r}: no preprocessor {preprocessor!r}; "
            f"choose one of {', '.join(PREPROCESSORS)}"
        )
    try:
        numbers = [float(part) for part in rest[1:]]
    except ValueError:
        raise ValueError(f"--control {spec!r}: STRENGTH, START and END are numbers") from None
    strength, start, end = (numbers + [1.0, 0.0, 1.0][len(numbers) :])[:3]
    return ControlChoice(model, preprocessor, strength, start, end), path
