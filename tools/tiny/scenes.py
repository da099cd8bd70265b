"""Procedural training scenes: flat-coloured shapes with compositional captions, drawn from a seed.

Nothing is stored on disk; a scene is a small record that renders to pixels and to a caption.
Some colour+shape pairs are held out of training so the evaluation can test composition.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SIZE = 128

OBJECT_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 40),
    "green": (40, 170, 60),
    "blue": (40, 90, 220),
    "purple": (150, 60, 190),
    "white": (245, 245, 245),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (20, 20, 20),
    "white": (245, 245, 245),
    "gray": (128, 128, 128),
    "blue": (40, 90, 220),
    "night sky": (20, 30, 90),
}
SHAPES = ("circle", "square", "triangle", "star")
SIZES: dict[str, int] = {"small": 34, "large": 58}
POSITIONS: dict[str, tuple[int, int]] = {
    "top left": (32, 32),
    "top right": (96, 32),
    "bottom left": (32, 96),
    "bottom right": (96, 96),
    "center": (64, 64),
}
CORNERS = ("top left", "top right", "bottom left", "bottom right")

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


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]
    background: str
    seed: int


def allowed(colour: str, background: str) -> bool:
    """An object never shares its background's colour (it would be invisible)."""
    return OBJECT_COLOURS[colour] != BACKGROUNDS[background]


def sample_scene(seed: int, split: str = "train", two_objects: float = 0.3) -> Scene:
    """A random scene; split "train" avoids HELD_OUT pairs, "heldout" draws only from them."""
    rng = np.random.default_rng(seed)
    background = str(rng.choice(list(BACKGROUNDS)))
    count = 2 if split == "train" and rng.random() < two_objects else 1
    positions = (
        [str(p) for p in rng.choice(CORNERS, size=2, replace=False)]
        if count == 2
        else [str(rng.choice(list(POSITIONS)))]
    )
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
    return Scene(tuple(objects), background, seed)


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
    image = Image.new("RGB", (SIZE, SIZE), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    if scene.background == "night sky":
        for x, y in rng.integers(0, SIZE, size=(30, 2)):
            draw.point((int(x), int(y)), fill=(235, 235, 210))
    for obj in scene.objects:
        cx, cy = np.array(POSITIONS[obj.position]) + rng.integers(-4, 5, size=2)
        d = SIZES[obj.size] * rng.uniform(0.92, 1.08)
        fill = OBJECT_COLOURS[obj.colour]
        if obj.shape == "circle":
            draw.ellipse((cx - d / 2, cy - d / 2, cx + d / 2, cy + d / 2), fill=fill)
        else:
            draw.polygon(_shape_polygon(obj.shape, float(cx), float(cy), d), fill=fill)
    return np.asarray(image)


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

    Leaving words out teaches the model that short prompts ("a red circle") are valid too.
    """
    order = list(scene.objects)
    if rng is not None:
        size, position, background = (bool(rng.random() > p) for p in (0.15, 0.15, 0.1))
        rng.shuffle(order)
    text = " and ".join(_object_phrase(o, size, position) for o in order)
    if background:
        text += (
            " in the night sky"
            if scene.background == "night sky"
            else f" on a {scene.background} background"
        )
    return text


def vocabulary() -> list[str]:
    """Every word the caption grammar can produce (the tokenizer is built from these)."""
    words = {"a", "and", "at", "the", "in", "on", "background", "center"}
    for phrase in [*OBJECT_COLOURS, *BACKGROUNDS, *SHAPES, *SIZES, *POSITIONS]:
        words.update(phrase.split())
    return sorted(words)
