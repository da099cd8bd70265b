"""The embedded model's ControlNet recipe: scribbles where the object is, and a training run
that saves a ControlNet the daemon lists and loads for the embedded model."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from helpers import trained_from
from PIL import Image, ImageFilter

from tools.tiny.scenes import (
    BACKGROUNDS,
    OBJECT_COLOURS,
    POSITIONS,
    model_backgrounds,
    render,
    sample_free_scene,
)
from tools.tiny.scribbles import KINDS, scribble, silhouette
from tools.tiny.scribbles import STAR_DOT as STAR


@pytest.mark.parametrize("kind", KINDS)
def test_a_scribble_marks_where_the_object_is(kind: str) -> None:
    rng = np.random.default_rng(0)
    for seed, (width, height) in enumerate([(128, 128), (168, 96), (112, 144)] * 5):
        scene = sample_free_scene(seed, width, height, free_form=0.5)  # the four shapes and others
        mask = silhouette(scene, render(scene))
        marks = scribble(mask, rng, kind) > 0
        # Near the object: within a hand's slip (10 px) of its silhouette.
        near = Image.fromarray(np.where(mask, 255, 0).astype(np.uint8))
        near = np.asarray(near.filter(ImageFilter.MaxFilter(21))) > 0
        assert marks.any(), (kind, seed)
        assert (marks & near).sum() >= 0.95 * marks.sum(), (kind, seed)


def test_a_free_form_is_one_object_of_its_colour_unlike_any_shape() -> None:
    for seed in range(40):
        scene = sample_free_scene(seed, 144, 112, free_form=1.0)
        (obj,) = scene.objects
        drawn = render(scene)
        plain = render(
            dataclasses.replace(scene, objects=(dataclasses.replace(obj, free_form=False),))
        )
        assert obj.free_form and not np.array_equal(drawn, plain)
        colours = {tuple(c) for c in drawn.reshape(-1, 3)} - {BACKGROUNDS[scene.background], STAR}
        assert colours == {OBJECT_COLOURS[obj.colour]}, seed  # flat, as the shapes are
    assert not any(sample_free_scene(seed).objects[0].free_form for seed in range(100))


def test_free_scenes_put_the_object_anywhere_not_only_at_the_named_places() -> None:
    centres = [sample_free_scene(seed).objects[0].at for seed in range(200)]
    named = set(POSITIONS.values())
    assert all(c is not None and c not in named for c in centres)
    xs, ys = zip(*centres, strict=True)
    assert min(xs) < 0.25 < 0.75 < max(xs) and min(ys) < 0.25 < 0.75 < max(ys)


def test_a_controlnet_is_scored_on_the_backgrounds_of_the_model_it_steers(tmp_path) -> None:
    from tools.tiny.evaluate import control_cases

    info = tmp_path / "sdbridge.json"
    info.write_text('{"backgrounds": ["gray", "night sky"]}')
    known = model_backgrounds(tmp_path)
    assert known == ("gray", "night sky")
    assert {scene.background for _, scene, *_ in control_cases(12, known)} == set(known)
    info.write_text("{}")  # a model that does not say: every background of the grammar
    assert model_backgrounds(tmp_path) == tuple(BACKGROUNDS)


def test_training_saves_a_controlnet_the_daemon_loads_for_the_embedded_model(tmp_path) -> None:
    import torch
    from diffusers import ControlNetModel, StableDiffusionPipeline

    from sdbridge.daemon.controlnets import ControlNetCache, ControlNetRegistry
    from sdbridge.tiny import MODEL_DIR
    from tools.tiny.train_controlnet import main

    main(["--out", str(tmp_path / "scribble"), "--steps", "2", "--pool", "32"])
    (entry,) = ControlNetRegistry(tmp_path).entries()
    assert (entry.name, entry.family) == ("scribble", "sd1")
    unet = StableDiffusionPipeline.from_pretrained(MODEL_DIR).unet
    net = ControlNetCache(torch.device("cpu"), torch.float32).get(entry, unet, "sdbridge-tiny")
    assert net.config.conditioning_embedding_out_channels == [16, 32, 64, 64]

    # Trained on from that one (--init): it starts from its weights, not from the UNet's copy.
    main(["--out", str(tmp_path / "on"), "--init", str(tmp_path / "scribble"), "--steps", "1"])
    start, after = (ControlNetModel.from_pretrained(tmp_path / run) for run in ("scribble", "on"))
    drift = max(
        (a - b).abs().max().item()
        for a, b in zip(start.parameters(), after.parameters(), strict=True)
    )
    assert 0 < drift < 1e-3


def test_the_evaluation_scores_an_object_that_covers_its_scribble_as_a_hit() -> None:
    from tools.tiny.analyse import objects_mask
    from tools.tiny.evaluate import CONTROL_IOU, control_cases, iou

    cases = control_cases(3)
    assert [kind for kind, *_ in cases[:4]] == [*KINDS, "diagonal bar"]
    for kind, scene, region, marks in cases:
        # The ground-truth picture of a scene covers the region it was scribbled from.
        if kind != "diagonal bar":
            assert iou(objects_mask(render(scene)), region) >= 0.9
        assert iou(marks > 0, region) > (0.5 if kind in ("blob", "diagonal bar") else 0.0)
    assert iou(region, ~region) == 0.0 < CONTROL_IOU


@pytest.fixture(scope="module")
def steered():
    """The packaged model with its packaged ControlNet, as the daemon runs them."""
    import torch
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    from sdbridge import tiny

    torch.set_num_threads(2)
    pipe = StableDiffusionControlNetPipeline.from_pretrained(
        tiny.MODEL_DIR, controlnet=ControlNetModel.from_pretrained(tiny.CONTROLNET_DIR)
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_the_packaged_controlnet_is_small_listed_first_and_made_for_the_embedded_model() -> None:
    import json

    from sdbridge import tiny
    from sdbridge.daemon.controlnets import embedded_controlnets

    weights = sum(p.stat().st_size for p in tiny.CONTROLNET_DIR.rglob("*.safetensors"))
    assert 0 < weights <= 10 * 1024 * 1024
    info = json.loads((tiny.CONTROLNET_DIR / "sdbridge.json").read_text())
    assert info["steers"] == tiny.NAME and info["preprocessor"] == "scribble"
    assert info["training"]["total_seconds"] <= 60 * 60
    # Reproducible from the repository: every ControlNet it was trained on from is in it.
    assert all((f / "config.json").exists() for f in trained_from(tiny.CONTROLNET_DIR))
    (entry,) = embedded_controlnets()
    assert (entry.name, entry.family, entry.path) == (
        tiny.CONTROLNET_NAME,
        "sd1",
        tiny.CONTROLNET_DIR,
    )


def test_the_packaged_controlnet_paints_the_object_on_held_out_scribbles(steered) -> None:
    """Scribbles of shapes at places training never drew (and a diagonal bar), at the sizes the
    engine picks for square, landscape and portrait canvases: the object covers the scribble,
    where the same prompt without the control puts it elsewhere."""
    import torch

    from sdbridge import tiny
    from tools.tiny.analyse import objects_mask
    from tools.tiny.evaluate import CONTROL_IOU, GUIDANCE, STEPS, control_cases, iou
    from tools.tiny.scenes import caption

    overlaps = {"with": [], "without": []}
    kinds = []
    for kind, scene, region, marks in control_cases(3, model_backgrounds(tiny.MODEL_DIR)):
        kinds.append(kind)
        common = dict(
            prompt=caption(scene, position=False),
            num_inference_steps=STEPS,
            guidance_scale=GUIDANCE,
            width=scene.width,
            height=scene.height,
        )
        control = Image.fromarray(marks).convert("RGB")
        for label, scale in (("with", 1.0), ("without", 0.0)):
            generator = torch.Generator().manual_seed(scene.seed)
            image = steered(
                image=control, controlnet_conditioning_scale=scale, generator=generator, **common
            ).images[0]
            overlaps[label].append(iou(objects_mask(np.asarray(image.convert("RGB"))), region))
    # (kind, IoU with control, IoU without) for every case.
    cases = [
        (kind, round(w, 2), round(wo, 2))
        for kind, w, wo in zip(kinds, overlaps["with"], overlaps["without"], strict=True)
    ]
    print("IoU with and without control:", cases)
    scribbles = [(w, wo) for kind, w, wo in cases if kind in KINDS]
    bars = [(w, wo) for kind, w, wo in cases if kind == "diagonal bar"]
    # On the backgrounds the model knows, blobs, outlines and strokes of the four shapes: all
    # but one at IoU >= 0.6 (all nine, 0.68 at the least, measured on AVX-512 and with AVX2
    # kernels alike). The bar, a form no scene has, is the hardest: 0.78, 0.78 and 0.74 (the
    # third stage's ControlNet: 0.79, 0.75 and 0.38).
    assert sum(w >= CONTROL_IOU for w, _ in scribbles) >= len(scribbles) - 1, cases
    assert np.mean([w for w, _ in bars]) >= 0.45, cases
    # Without the control the object is elsewhere: a scribble near the center, where a prompt
    # without a place puts it, overlaps it a little (0.31 at the most, measured). Each scribble
    # beats its own baseline; the bars together (the third stage's ControlNet covered one only
    # in part, 0.38 against 0.19).
    assert all(w > wo + 0.2 for w, wo in scribbles), cases
    assert np.mean([w - wo for w, wo in bars]) > 0.2, cases
    assert np.mean(overlaps["without"]) < 0.25, cases
