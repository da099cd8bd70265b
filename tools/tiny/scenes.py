"""Procedural training scenes: flat-coloured shapes with compositional captions, drawn from a seed.

Nothing is stored on disk; a scene is a small record that renders to pixels and to a caption.
Some colour+shape pairs are held out of training so the evaluation can test composition.
A scene has its own width and height (the aspect buckets of training): positions are read
relative to the image and object sizes relative to its shorter side, so "at the top left" means
the same part of a 184x88 image as of a 128x128 one.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SIZE = 128  # the native side; buckets keep about its area

OBJECT_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 40),
    "green": (40, 170, 60),
    "blue": (40, 90, 220),
    "purple": (150, 60, 190),
    "white": (245, 245, 245),
}
# Every object colour is a background too (an object never shares its background's colour).
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    **OBJECT_COLOURS,
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
    "night sky": (20, 30, 90),
}
SHAPES = ("circle", "square", "triangle", "star")
SIZES: dict[str, int] = {"small": 34, "large": 58}  # diameters on a 128 px shorter side
# Centres as fractions of the width and height.
POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (0.25, 0.25),
    "top right": (0.75, 0.25),
    "bottom left": (0.25, 0.75),
    "bottom right": (0.75, 0.75),
    "center": (0.5, 0.5),
}
CORNERS = ("top left", "top right", "bottom left", "bottom right")
# Where objects go when a caption names no position: one in the center, two on the diagonal
# (the first named at the top left). A place left to chance made the model paint the object
# at several places at once; a fixed one is what a short prompt means.
UNPLACED: dict[int, tuple[str, ...]] = {1: ("center",), 2: ("top left", "bottom right")}
# The background a caption without one means: white, black behind a white object. A
# background left to chance made the model blend several into a mottled one with stray blobs.
UNNAMED_BACKGROUND, UNNAMED_BEHIND_WHITE = "white", "black"
# Share of the captions of a scene laid out as UNPLACED, or on its unnamed background, that
# leave the place or the background out.
LEFT_OUT = 0.6

# One unseen shape per colour: the evaluation asks for exactly these combinations.
HELD_OUT: frozenset[tuple[str, str]] = frozenset(
    {
        ("red", "star"),
        ("orange", "triangle"),
        ("yellow", "square"),
        ("green", "circle"),
        ("blue", "triangle"),
        ("purple", "star"),
        ("white", "circle"),
    }
)


@dataclass(frozen=True)
class Obj:
    colour: str
    shape: str
    size: str
    position: str
    # A centre anywhere (fractions of the width and height) in place of the named position's:
    # where a control image, not the caption, decides.
    at: tuple[float, float] | None = None
    # Drawn as a free form (a bar, an ellipse, a lumpy blob) in place of its shape: what a
    # control image outlines, not the shape the caption names, decides.
    free_form: bool = False


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]
    background: str
    seed: int
    width: int = SIZE
    height: int = SIZE

    def centre(self, obj: Obj) -> tuple[float, float]:
        """The object's nominal centre in pixels."""
        fx, fy = obj.at or POSITIONS[obj.position]
        return fx * self.width, fy * self.height

    def diameter(self, obj: Obj) -> float:
        """The object's nominal diameter in pixels: its size on a 128 px shorter side, scaled."""
        return SIZES[obj.size] * min(self.width, self.height) / SIZE

    def unplaced(self) -> bool:
        """Whether the layout is the one a caption without positions means."""
        return tuple(o.position for o in self.objects) == UNPLACED[len(self.objects)]

    def plain(self) -> bool:
        """Whether the background is the one a caption without a background means."""
        return self.background == unnamed_background(self.objects)


def unnamed_background(objects: Sequence[Obj]) -> str:
    """The background a caption that names none means for these objects."""
    white = any(o.colour == "white" for o in objects)
    return UNNAMED_BEHIND_WHITE if white else UNNAMED_BACKGROUND


def allowed(colour: str, background: str) -> bool:
    """An object never shares its background's colour (it would be invisible)."""
    return OBJECT_COLOURS[colour] != BACKGROUNDS[background]


def sample_scene(
    seed: int,
    split: str = "train",
    two_objects: float = 0.3,
    width: int = SIZE,
    height: int = SIZE,
    backgrounds: Sequence[str] = tuple(BACKGROUNDS),
    plain: float = 0.0,
) -> Scene:
    """A random scene on one of `backgrounds`; split "train" avoids HELD_OUT pairs, "heldout"
    draws only from them. A share `plain` of scenes is moved onto the background a caption
    without one means (the scene is otherwise the same: the draws before are unchanged)."""
    rng = np.random.default_rng(seed)
    background = str(rng.choice(list(backgrounds)))
    count = 2 if split == "train" and rng.random() < two_objects else 1
    if count == 1:
        positions = [str(rng.choice(list(POSITIONS)))]
    elif rng.random() < 0.25:  # often enough that two objects named without places are learnt
        positions = list(UNPLACED[2])
    else:
        positions = [str(p) for p in rng.choice(CORNERS, size=2, replace=False)]
    objects = []
    for position in positions:
        while True:
            if split == "heldout":
                colour, shape = sorted(HELD_OUT)[rng.integers(len(HELD_OUT))]
            else:
                colour, shape = str(rng.choice(list(OBJECT_COLOURS))), str(rng.choice(SHAPES))
            if (split == "heldout") == ((colour, shape) in HELD_OUT) and allowed(
                colour, background
            ):
                break
        objects.append(Obj(colour, shape, str(rng.choice(list(SIZES))), position))
    if plain and rng.random() < plain:
        background = unnamed_background(objects)
    return Scene(tuple(objects), background, seed, width, height)


def sample_free_scene(
    seed: int,
    width: int = SIZE,
    height: int = SIZE,
    free_form: float = 0.0,
    backgrounds: Sequence[str] = tuple(BACKGROUNDS),
    plain: float = 0.0,
) -> Scene:
    """One object of a training colour and shape centred anywhere (not only at the named places),
    its named position the nearest one: a scene whose layout a control image gives. A share
    `free_form` of them draw the object as a free form, a share `plain` is on the background a
    caption without one means."""
    rng = np.random.default_rng(seed)
    scene = sample_scene(
        seed, two_objects=0, width=width, height=height, backgrounds=backgrounds, plain=plain
    )
    at = (float(rng.uniform(0.15, 0.85)), float(rng.uniform(0.15, 0.85)))
    nearest = min(POSITIONS, key=lambda p: np.hypot(*np.subtract(POSITIONS[p], at)))
    (obj,) = scene.objects
    free = bool(rng.random() < free_form)
    return replace(scene, objects=(replace(obj, position=nearest, at=at, free_form=free),))


def model_backgrounds(model: Path) -> tuple[str, ...]:
    """The backgrounds a model folder's training drew (its sdbridge.json), all by default: a
    ControlNet is scored in the vocabulary of the model it steers."""
    info = json.loads((model / "sdbridge.json").read_text())
    return tuple(info.get("backgrounds", BACKGROUNDS))


def _shape_polygon(shape: str, cx: float, cy: float, d: float) -> list[tuple[float, float]]:
    r = d / 2
    if shape == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    # Five-pointed star pointing up; its inner radius makes it clearly concave.
    angles = np.arange(10) * np.pi / 5 - np.pi / 2
    radii = np.where(np.arange(10) % 2 == 0, r, r * 0.42)
    return [
        (cx + rr * np.cos(a), cy + r * 0.1 + rr * np.sin(a))
        for a, rr in zip(angles, radii, strict=True)
    ]


def render(scene: Scene) -> np.ndarray:
    """The scene as a uint8 HxWx3 array; jitter in place and size comes from the scene's seed."""
    rng = np.random.default_rng(scene.seed + 1_000_003)
    width, height = scene.width, scene.height
    image = Image.new("RGB", (width, height), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    if scene.background == "night sky":
        stars = round(30 * width * height / SIZE**2)
        for x, y in rng.integers(0, (width, height), size=(stars, 2)):
            draw.point((int(x), int(y)), fill=(235, 235, 210))
    unit = min(width, height) / SIZE
    for obj in scene.objects:
        cx, cy = np.array(scene.centre(obj)) + rng.integers(-4, 5, size=2) * unit
        d = scene.diameter(obj) * rng.uniform(0.92, 1.08)
        fill = OBJECT_COLOURS[obj.colour]
        if obj.free_form:
            draw.polygon(_free_polygon(rng, float(cx), float(cy), d), fill=fill)
        elif obj.shape == "circle":
            draw.ellipse((cx - d / 2, cy - d / 2, cx + d / 2, cy + d / 2), fill=fill)
        else:
            draw.polygon(_shape_polygon(obj.shape, float(cx), float(cy), d), fill=fill)
    return np.asarray(image)


def _free_polygon(
    rng: np.random.Generator, cx: float, cy: float, d: float
) -> list[tuple[float, float]]:
    """A form no shape has, about `d` across: a bar, a narrow ellipse or a lumpy blob, turned
    any way."""
    kind = rng.integers(3)
    theta = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    if kind == 0:  # a bar: long and thin
        length, thick = d * rng.uniform(0.8, 1.8), d * rng.uniform(0.15, 0.35)
        xs = np.array([-1, 1, 1, -1]) * length / 2
        ys = np.array([-1, -1, 1, 1]) * thick / 2
    elif kind == 1:  # an ellipse of any aspect
        xs = np.cos(theta) * d / 2 * rng.uniform(0.8, 1.5)
        ys = np.sin(theta) * d / 2 * rng.uniform(0.25, 0.8)
    else:  # a blob: a radius that swells and dips
        radius = np.full_like(theta, d / 2)
        for k in (2, 3, 4):
            radius *= 1 + rng.uniform(-0.25, 0.25) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
        xs, ys = np.cos(theta) * radius, np.sin(theta) * radius
    turn = rng.uniform(0, np.pi)
    cos, sin = np.cos(turn), np.sin(turn)
    return [(cx + x * cos - y * sin, cy + x * sin + y * cos) for x, y in zip(xs, ys, strict=True)]


def _object_phrase(obj: Obj, size: bool, position: bool) -> str:
    words = ["a"] + ([obj.size] if size else []) + [obj.colour, obj.shape]
    if position:
        words += ["in the center"] if obj.position == "center" else ["at the", obj.position]
    return " ".join(words)


def caption(
    scene: Scene,
    rng: np.random.Generator | None = None,
    *,
    size: bool = True,
    position: bool = True,
    background: bool = True,
) -> str:
    """The caption, with the attributes asked for; with a random generator one that sometimes
    leaves attributes out (the flags then come from it).

    Leaving words out teaches the model that short prompts ("a red circle") are valid too. A
    caption names no positions only for a scene laid out as such a caption means (UNPLACED),
    and then names the objects in that order; it names no background only for a scene on the
    background such a caption means (unnamed_background).
    """
    order = list(scene.objects)
    short_background = False
    if rng is not None:
        size, position, background = bool(rng.random() > 0.2), True, True
        if scene.unplaced():
            position = bool(rng.random() > LEFT_OUT)
        if scene.plain():
            background = bool(rng.random() > LEFT_OUT)
        short_background = bool(rng.random() < 0.3)
        rng.shuffle(order)
    if not position:
        order = list(scene.objects)
    text = " and ".join(_object_phrase(o, size, position) for o in order)
    if background:
        if scene.background == "night sky":
            text += " in the night sky"
        else:
            text += (
                f" on {scene.background}"
                if short_background
                else (f" on a {scene.background} background")
            )
    return text


def vocabulary() -> list[str]:
    """Every word the caption grammar can produce (the tokenizer is built from these)."""
    words = {"a", "and", "at", "the", "in", "on", "background", "center"}
    for phrase in [*OBJECT_COLOURS, *BACKGROUNDS, *SHAPES, *SIZES, *POSITIONS]:
        words.update(phrase.split())
    return sorted(words)
