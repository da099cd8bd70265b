"""The embedded tiny model: scenes, tokenizer, analyser, and the packaged weights themselves."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import trained_from
from PIL import Image

from sdbridge.tiny import MODEL_DIR, NAME
from tools.tiny.analyse import ATTRIBUTES, analyse, score
from tools.tiny.scenes import (
    BACKGROUNDS,
    HELD_OUT,
    OBJECT_COLOURS,
    SHAPES,
    SIZE,
    Obj,
    Scene,
    allowed,
    caption,
    model_backgrounds,
    render,
    sample_scene,
    vocabulary,
)
from tools.tiny.tokenizer import MAX_LENGTH, build_tokenizer

trained = pytest.mark.skipif(
    not (MODEL_DIR / "model_index.json").exists(), reason="the tiny model is not trained yet"
)


def test_package_import_stays_light() -> None:
    code = "import sys, sdbridge.tiny as t; assert 'torch' not in sys.modules; print(t.MODEL_DIR)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(MODEL_DIR)
    assert NAME == "sdbridge-tiny"


def test_held_out_pairs_never_reach_training() -> None:
    for seed in range(300):
        pairs = {(o.colour, o.shape) for o in sample_scene(seed).objects}
        assert not pairs & HELD_OUT
        held = sample_scene(seed, "heldout")
        assert {(o.colour, o.shape) for o in held.objects} <= HELD_OUT


def test_scenes_are_deterministic_images() -> None:
    scene = sample_scene(7)
    image = render(scene)
    assert image.shape == (SIZE, SIZE, 3) and image.dtype == np.uint8
    assert np.array_equal(image, render(sample_scene(7)))
    assert caption(scene) == caption(sample_scene(7))


def test_training_covers_every_size_the_engine_picks_for_the_model() -> None:
    """Buckets from 1:2 to 2:1 at about the native area; scenes at each read back correctly,
    on every background (every object colour is one too, never under its own colour)."""
    from tools.tiny.train import buckets

    sizes = buckets()
    assert (88, 184) in sizes and (184, 88) in sizes and (144, 112) in sizes and (168, 96) in sizes
    assert all(w % 8 == 0 and h % 8 == 0 and 0.45 <= w / h <= 2.1 for w, h in sizes)
    assert {OBJECT_COLOURS[c] for c in OBJECT_COLOURS} <= {BACKGROUNDS[b] for b in BACKGROUNDS}
    seen_backgrounds = set()
    for seed, (width, height) in enumerate(sizes * 4):
        scene = sample_scene(seed, two_objects=0, width=width, height=height)
        image = render(scene)
        assert image.shape == (height, width, 3)
        result = score(analyse(image), scene)
        assert result == dict.fromkeys(ATTRIBUTES, True), (scene, result)
        seen_backgrounds.add(scene.background)
    assert len(seen_backgrounds) >= 8


def test_a_caption_leaves_out_places_only_for_the_layout_that_means() -> None:
    """No position named: one object in the center, two on the diagonal from the top left,
    in the order named. Size may be left out of any caption."""
    rng = np.random.default_rng(0)
    short = 0
    for seed in range(600):
        scene = sample_scene(seed)
        text = caption(scene, rng)
        if " at the " in text or " in the center" in text:
            continue
        short += 1
        positions = tuple(o.position for o in scene.objects)
        assert positions in (("center",), ("top left", "bottom right")), (scene, text)
        first = scene.objects[0]
        assert text.startswith(f"a {first.size} {first.colour}") or text.startswith(
            f"a {first.colour}"
        )
    assert 30 <= short <= 200
    full = caption(Scene((Obj("red", "circle", "small", "center"),), "yellow", seed=0))
    assert full == "a small red circle in the center on a yellow background"


def test_a_caption_leaves_out_the_background_only_when_it_is_white_or_black_behind_white() -> None:
    """A prompt without a background ("a red circle") means a white one, as on a new canvas;
    black behind a white object. Training moves a share of scenes there, changing nothing else."""
    rng = np.random.default_rng(0)
    unnamed = 0
    for seed in range(600):
        scene = sample_scene(seed, plain=0.25)
        assert scene.objects == sample_scene(seed).objects
        text = caption(scene, rng)
        if " on " in text or text.endswith(" in the night sky"):
            continue
        unnamed += 1
        white = any(o.colour == "white" for o in scene.objects)
        assert scene.background == ("black" if white else "white"), (scene, text)
    assert 60 <= unnamed <= 200


def test_every_grammar_word_is_one_token_and_captions_fit() -> None:
    tokenizer = build_tokenizer()
    for word in vocabulary():
        assert len(tokenizer.tokenize(word)) == 1, word
    longest = max((caption(sample_scene(s)) for s in range(500)), key=lambda c: len(c.split()))
    assert len(tokenizer(longest).input_ids) <= MAX_LENGTH


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_analyser_reads_procedural_scenes(split: str) -> None:
    for seed in range(25):
        scene = sample_scene(seed, split, two_objects=0)
        result = score(analyse(render(scene)), scene)
        assert result == dict.fromkeys(ATTRIBUTES, True), (scene, result)


def test_analyser_counts_objects_and_reads_a_canvas_of_any_size() -> None:
    """The second version paints at other sizes: the analyser reads position and size
    relative to the image, and counts the objects (a duplicate is a miss)."""
    for seed in range(10):
        pair = sample_scene(seed, two_objects=1.0)
        assert len(pair.objects) == 2 and analyse(render(pair)).count == 2
        single = sample_scene(seed, two_objects=0)
        bigger = Image.fromarray(render(single)).resize((192, 192), Image.Resampling.NEAREST)
        result = score(analyse(np.asarray(bigger)), single)
        assert result == dict.fromkeys(ATTRIBUTES, True), (single, result)


@pytest.fixture(scope="module")
def pipe():
    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch
    from diffusers import StableDiffusionPipeline

    torch.set_num_threads(2)
    pipeline = StableDiffusionPipeline.from_pretrained(MODEL_DIR)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@trained
def test_packaged_folder_is_small_and_describes_itself() -> None:
    weights = sum(p.stat().st_size for p in MODEL_DIR.rglob("*.safetensors"))
    assert 0 < weights <= 20 * 1024 * 1024
    info = json.loads((MODEL_DIR / "sdbridge.json").read_text())
    assert info["name"] == NAME and info["native_size"] == SIZE
    # The engine generates at what training covered (daemon/resolution.py).
    assert info["sizes"] == {"low": SIZE, "high": SIZE, "multiple": 8}
    assert set(info["backgrounds"]) == set(BACKGROUNDS)  # every object colour, black, gray...
    # Reproducible from the repository: every folder the weights were trained on from is in it.
    assert all((f / "model_index.json").exists() for f in trained_from(MODEL_DIR))


# The backgrounds the committed weights were trained on.
TRAINED_BACKGROUNDS = model_backgrounds(MODEL_DIR)

# (colour, shape, position, background) asked for; a green circle was never seen in training.
ASKED = [
    ("red", "circle", "top left", "white"),
    ("blue", "square", "bottom right", "black"),
    ("yellow", "triangle", "top right", "gray"),
    ("green", "circle", "center", "black"),
]
PROMPTS = [caption(Scene((Obj(c, s, "large", p),), bg, seed=0)) for c, s, p, bg in ASKED]


def _paint(pipe, prompts: list[str], width: int = SIZE, height: int = SIZE) -> list[np.ndarray]:
    """One image per prompt at 20 steps and guidance 5, prompt i with seed i."""
    import torch

    images = pipe(
        prompts,
        num_inference_steps=20,
        guidance_scale=5.0,
        height=height,
        width=width,
        generator=[torch.Generator().manual_seed(i) for i in range(len(prompts))],
    ).images
    return [np.asarray(im.convert("RGB")) for im in images]


@pytest.fixture(scope="module")
def generated(pipe) -> list[np.ndarray]:
    return _paint(pipe, PROMPTS)


@trained
def test_generates_the_background_asked_for(generated) -> None:
    assert [analyse(im).background for im in generated] == [bg for *_, bg in ASKED]


def _colours_painted(pipe, pairs: list[tuple[str, str]]) -> list[tuple[tuple, str]]:
    """(asked, colour read) for each pair, large in the center, on a light, a mid and a dark
    background."""
    asked = [(c, s, bg) for c, s in pairs for bg in ("white", "gray", "black") if allowed(c, bg)]
    prompts = [caption(Scene((Obj(c, s, "large", "center"),), bg, seed=0)) for c, s, bg in asked]
    return list(zip(asked, [analyse(im).colour for im in _paint(pipe, prompts)], strict=True))


@trained
def test_generates_the_object_colour_asked_for(pipe) -> None:
    """Every colour with a shape it was trained with. Measured 20 of 20; the second version's
    second stage painted large green circles and squares on black purple and green (19 of 20,
    docs/tiny-model.md)."""
    pairs = [(c, next(s for s in SHAPES if (c, s) not in HELD_OUT)) for c in OBJECT_COLOURS]
    report = _colours_painted(pipe, pairs)
    assert sum(colour == wanted for (wanted, _, _), colour in report) >= 0.9 * len(report), report


@trained
def test_paints_colour_and_shape_pairs_it_never_saw_mostly_in_their_colour(pipe) -> None:
    """Every held-out pair. Which few fail changes from one training run to the next (the
    second version's first stage: blue triangles on black; its second: green circles on
    black; its third and fourth: a purple star on black); measured 19 of 20, and the evaluation
    94% at the engine's sizes."""
    report = _colours_painted(pipe, sorted(HELD_OUT))
    assert sum(colour == wanted for (wanted, _, _), colour in report) >= 0.8 * len(report), report


@trained
def test_generates_the_object_where_asked(generated) -> None:
    assert [analyse(im).position for im in generated] == [where for _, _, where, _ in ASKED]


# Seen colour+shape pairs at every place, on backgrounds the committed model knows.
AT_CANVAS = [
    ("red", "circle", "top left", "white"),
    ("blue", "square", "bottom right", "black"),
    ("yellow", "triangle", "top right", "gray"),
    ("green", "square", "center", "black"),
    ("orange", "star", "bottom left", "blue"),
    ("purple", "circle", "center", "white"),
    ("white", "triangle", "bottom left", "night sky"),
    ("red", "square", "top right", "gray"),
    ("yellow", "circle", "bottom right", "night sky"),
    ("blue", "star", "top left", "white"),
]


@trained
def test_a_512x384_canvas_mostly_gets_one_object_where_asked(pipe) -> None:
    """At the size the engine picks for an ordinary Krita canvas (144x112), not the native
    square: exactly one object, in the asked-for place. The committed model, trained at every
    aspect bucket, does this for 97% of held-out captions (docs/tiny-model.md); the first
    version for about four in five, and at 224x168, the SD 1.x range it had before, one in
    three, where a star asked for in the center came out four times."""
    from sdbridge.daemon.resolution import size_range

    width, height = size_range("sd1", SIZE, str(MODEL_DIR)).fit(512, 384)
    assert (width, height) == (144, 112)
    prompts = [caption(Scene((Obj(c, s, "large", p),), bg, seed=0)) for c, s, p, bg in AT_CANVAS]
    found = [analyse(image) for image in _paint(pipe, prompts, width, height)]
    placed = [
        (a.count, a.position) == (1, p) for a, (_, _, p, _) in zip(found, AT_CANVAS, strict=True)
    ]
    assert sum(placed) >= 9, list(zip(prompts, found, strict=True))
    assert sum(a.colour == c for a, (c, *_) in zip(found, AT_CANVAS, strict=True)) >= 9


# Prompts as an artist types them: no place (which means the center), no size, no background
# (which means white, black behind white), and backgrounds the first version never painted.
# Colour and shape pairs seen in training.
SHORT = [
    ("a red circle", "red", "white"),
    ("a blue square", "blue", "white"),
    ("a large yellow star", "yellow", "white"),
    ("a white star", "white", "black"),
    ("a purple square on yellow", "purple", "yellow"),
    ("a white star on red", "white", "red"),
    ("a green triangle on a purple background", "green", "purple"),
    ("a small red square on green", "red", "green"),
    ("a yellow circle in the night sky", "yellow", "night sky"),
]


@trained
def test_a_short_prompt_paints_one_object_in_the_center_on_any_background(pipe) -> None:
    """At a 512x384 canvas's size. The first version painted the object of a prompt without a
    place at several places at once, and a background it did not know as another; the second
    version's first stage blended several backgrounds for a prompt that names none."""
    found = [analyse(im) for im in _paint(pipe, [p for p, *_ in SHORT], 144, 112)]
    report = list(zip(SHORT, found, strict=True))
    assert sum((a.count, a.position) == (1, "center") for a in found) >= 8, report
    assert sum(a.colour == colour for (_, colour, _), a in report) >= 8, report
    assert all(a.background == bg for (_, _, bg), a in report), report


@trained
def test_img2img_repaints_more_the_higher_the_strength(pipe) -> None:
    """'Repaint a little' exists: with a prompt that disagrees with the init image, strength 0.3
    changes it far less than a full repaint (the first version: 85% of it at 0.3)."""
    from tools.tiny.evaluate import img2img_change

    change = img2img_change(pipe, count=4)
    assert change[0.1] < change[0.3] < change[0.5] < change[1.0], change
    assert change[0.3] <= 0.4 * change[1.0], change


@trained
def test_vae_round_trip_keeps_scenes_readable(pipe) -> None:
    from tools.tiny.evaluate import round_trip

    scenes = [sample_scene(seed, two_objects=0) for seed in range(8)]
    out = round_trip(pipe, scenes)
    assert [score(analyse(o), s) for o, s in zip(out, scenes, strict=True)] == [
        dict.fromkeys(ATTRIBUTES, True)
    ] * len(scenes)


@trained
def test_first_step_layout_puts_the_object_where_the_prompt_says(pipe) -> None:
    # The layout is decided at the first sampling step, from pure noise: one copy in the asked-for
    # corner or center, not one in every corner (what the previous weights did: docs/tiny-model.md).
    from tools.tiny.evaluate import eval_scenes, first_step_layout

    scenes = [
        dataclasses.replace(s, background=next(b for b in TRAINED_BACKGROUNDS if allowed(c, b)))
        for s, c in ((s, s.objects[0].colour) for s in eval_scenes(HELD_OUT, seed=1)[::3])
    ]
    layouts = first_step_layout(pipe, scenes)
    assert [analyse(im).position for im in layouts] == [s.objects[0].position for s in scenes]


@trained
def test_img2img_and_inpainting_share_the_model(pipe) -> None:
    import torch
    from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting

    start = Image.fromarray(render(sample_scene(3, two_objects=0)))
    mask = Image.new("L", (SIZE, SIZE), 0)
    mask.paste(255, (0, 0, SIZE // 2, SIZE // 2))
    i2i = AutoPipelineForImage2Image.from_pipe(pipe)
    out = i2i(
        "a large green star in the center on a white background",
        image=start,
        strength=0.6,
        num_inference_steps=10,
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    assert out.size == (SIZE, SIZE)
    inpaint = AutoPipelineForInpainting.from_pipe(pipe)
    assert inpaint.unet is pipe.unet
    out = inpaint(
        "a small red circle at the top left",
        image=start,
        mask_image=mask,
        height=SIZE,
        width=SIZE,
        num_inference_steps=10,
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    assert out.size == (SIZE, SIZE)


def test_training_is_reproducible_and_saves_a_loadable_model(tmp_path) -> None:
    # A few steps of every phase: the committed weights must be reproducible from the script.
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    from tools.tiny.train import main

    steps = ["--vae-steps", "3", "--decoder-steps", "2", "--pool", "64", "--unet-steps", "3"]
    for run in ("a", "b"):
        main(["--out", str(tmp_path / run), *steps])
    for part in ("unet", "vae", "text_encoder"):
        a, b = (load_file(next((tmp_path / run / part).glob("*.safetensors"))) for run in "ab")
        assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a), part
    info = json.loads((tmp_path / "a" / "sdbridge.json").read_text())
    assert (info["training"]["unet_steps"], info["training"]["pool"]) == (3, 64)
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "a")
    image = pipe("a red circle", num_inference_steps=2, height=SIZE, width=SIZE).images[0]
    assert image.size == (SIZE, SIZE)


def test_training_on_from_a_model_keeps_the_latent_space_its_unet_reads(tmp_path) -> None:
    """--init: a version trained on from the one before keeps that one's encoder and latent
    scaling factor (what its UNet and ControlNet were trained on), and trains the rest on."""
    from safetensors.torch import load_file
    from transformers import CLIPTokenizer

    from tools.tiny.train import main

    steps = ["--vae-steps", "3", "--decoder-steps", "2", "--pool", "64", "--unet-steps", "3"]
    base, after = tmp_path / "base", tmp_path / "after"
    main(["--out", str(base), *steps])
    main(["--out", str(after), "--init", str(base), *steps])

    def weights(run, part):
        return load_file(next((run / part).glob("*.safetensors")))

    before, now = weights(base, "vae"), weights(after, "vae")
    encoder = [k for k in before if k.startswith(("encoder.", "quant_conv."))]
    assert encoder and all(before[k].equal(now[k]) for k in encoder)
    assert any(not before[k].equal(now[k]) for k in before if k.startswith("decoder."))
    scale = [json.loads((run / "vae" / "config.json").read_text()) for run in (base, after)]
    assert scale[0]["scaling_factor"] == scale[1]["scaling_factor"]
    before, now = weights(base, "unet"), weights(after, "unet")
    assert any(not before[k].equal(now[k]) for k in before)
    info = json.loads((after / "sdbridge.json").read_text())["training"]
    assert (info["init"], info["vae_steps"], info["unet_steps"]) == (str(base), 0, 3)

    # A folder whose tokenizer numbers words otherwise: its text encoder would read other words.
    tokenizer = CLIPTokenizer.from_pretrained(base / "tokenizer")
    tokenizer.add_tokens(["zebra"])
    tokenizer.save_pretrained(base / "tokenizer")
    with pytest.raises(SystemExit, match="tokenizer"):
        main(["--out", str(tmp_path / "other"), "--init", str(base), *steps])
