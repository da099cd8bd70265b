"""Control layers as a front-end keeps them: which ControlNet reads a layer, and how strongly.

The artist goes on painting the layer, so a choice holds no pixels: `control_entries` pairs
each with its layer's pixels over the job's region when a job is made (the protocol's
`control` entries, docs/protocol.md).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..wire.protocol import MAX_CONTROLS, PREPROCESSORS, encode_png
from .canvas import JobPlan, image_map
from .session import DaemonInfo

# What the editors call each preprocessor: the kind of layer it reads.
KINDS = {
    "scribble": "Scribble",  # strokes or blobs on a transparent layer (or dark on light)
    "canny": "Edges (Canny)",  # the outlines of a picture
    "none": "Control image as is",  # a layer that already is one (e.g. white lines on black)
}
DEFAULT_PREPROCESSOR = "scribble"  # a new control layer is one the artist draws on


@dataclass(frozen=True)
class ControlChoice:
    model: str = ""  # a name from the daemon's `controlnets`; "": its first that fits the model
    preprocessor: str = "none"
    strength: float = 1.0
    start: float = 0.0
    end: float = 1.0

    def entry(self, image: Mapping[str, Any]) -> dict[str, Any]:
        """The `control` entry of this choice over `image`, a wire image map."""
        model = {"model": self.model} if self.model else {}
        return {
            "image": dict(image),
            **model,
            "preprocessor": self.preprocessor,
            "strength": self.strength,
            "start": self.start,
            "end": self.end,
        }


def check_controls(choices: Sequence[ControlChoice], info: DaemonInfo) -> str | None:
    """What stops these control layers from steering a job, in a sentence for the artist, or
    None. As `session.check_settings`: the daemon checks everything again (and says when none
    of its ControlNets fits the model)."""
    if not choices:
        return None
    if "control" not in info.capabilities:
        return "This daemon cannot use control layers: update sdbridge where it runs."
    if len(choices) > MAX_CONTROLS:
        return f"At most {MAX_CONTROLS} control layers steer a job: remove some."
    for choice in choices:
        if choice.model and choice.model not in info.controlnets:
            listed = ", ".join(info.controlnets) or "none"
            return f"The daemon has no ControlNet “{choice.model}”; its ControlNets: {listed}."
        if choice.preprocessor not in PREPROCESSORS:
            return f"No control kind “{choice.preprocessor}”: use {', '.join(KINDS)}."
    return None


def control_entries(
    controls: Sequence[tuple[ControlChoice, bytes | bytearray]], plan: JobPlan
) -> list[dict[str, Any]]:
    """The `control` entries of a job over `plan`'s region: each choice with its layer's RGBA
    over `plan.bounds`. PNG, not raw: a drawn layer compresses to little, and raw images would
    count against `limits.max_message_bytes` beside the init image and mask."""
    extent = plan.bounds.extent
    entries = []
    for choice, rgba in controls:
        raw = image_map(extent, rgba)  # checks the size
        png = encode_png(extent.width, extent.height, raw["data"])
        entries.append(choice.entry({**raw, "format": "png", "data": png}))
    return entries


AUTO_MODEL = "auto"  # the CLI's word for "the daemon's first ControlNet that fits the model"


def parse_control(spec: str) -> tuple[ControlChoice, str]:
    """`MODEL,IMAGE[,PREPROCESSOR[,STRENGTH[,START,END]]]` (the CLI's `--control`; MODEL `auto`
    leaves the choice to the daemon): the choice and the control image's path. ValueError says
    what is wrong."""
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
    model = "" if model == AUTO_MODEL else model
    return ControlChoice(model, preprocessor, strength, start, end), path
