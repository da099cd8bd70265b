"""Evaluate the tiny model on captions it never saw, scored by the pixel analyser.

    python -m tools.tiny.evaluate [--model DIR] [--sheet held_out.png]

Held-out captions pair each colour with the one shape it never appeared with in training, at
every position and both sizes. Also reports the same scores on seen combinations, on an empty
caption (should be near chance), the effect of guidance, where the model puts objects at the
first sampling step, and the time of one image.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from sdbridge.tiny import MODEL_DIR

from .analyse import ATTRIBUTES, analyse, score
from .scenes import (
    BACKGROUNDS,
    HELD_OUT,
    OBJECT_COLOURS,
    POSITIONS,
    SHAPES,
    SIZE,
    SIZES,
    Obj,
    Scene,
    allowed,
    caption,
    render,
    sample_scene,
)
from .train import to_tensor

TARGETS = {"colour": 0.9, "background": 0.9, "position": 0.8, "shape": 0.8}
STEPS = 20
GUIDANCE = 5.0


def load(model: Path = MODEL_DIR, threads: int = 2) -> StableDiffusionPipeline:
    torch.set_num_threads(threads)
    pipe = StableDiffusionPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def eval_scenes(pairs: Iterable[tuple[str, str]], seed: int) -> list[Scene]:
    """Every pair at every position and both sizes, on a random allowed background."""
    rng = np.random.default_rng(seed)
    scenes = []
    for colour, shape in sorted(pairs):
        for position in POSITIONS:
            for size in SIZES:
                options = [b for b in BACKGROUNDS if allowed(colour, b)]
                background = options[rng.integers(len(options))]
                scene_seed = seed * 10_000 + len(scenes)
                scenes.append(Scene((Obj(colour, shape, size, position),), background, scene_seed))
    return scenes


def generate(
    pipe: StableDiffusionPipeline,
    prompts: list[str],
    seeds: list[int],
    guidance: float = GUIDANCE,
    steps: int = STEPS,
    batch: int = 10,
) -> list[np.ndarray]:
    images = []
    for start in range(0, len(prompts), batch):
        out = pipe(
            prompts[start : start + batch],
            num_inference_steps=steps,
            guidance_scale=guidance,
            height=SIZE,
            width=SIZE,
            generator=[torch.Generator().manual_seed(s) for s in seeds[start : start + batch]],
        )
        images += [np.asarray(im.convert("RGB")) for im in out.images]
    return images


def accuracy(images: list[np.ndarray], scenes: list[Scene]) -> dict[str, float]:
    results = [score(analyse(im), sc) for im, sc in zip(images, scenes, strict=True)]
    return {a: sum(r[a] for r in results) / len(results) for a in ATTRIBUTES}


def chance(scenes: list[Scene]) -> dict[str, float]:
    """Accuracy of always answering the most frequent value (the best blind guess)."""
    values = {
        "colour": [s.objects[0].colour for s in scenes],
        "background": [s.background for s in scenes],
        "position": [s.objects[0].position for s in scenes],
        "shape": [s.objects[0].shape for s in scenes],
        "size": [s.objects[0].size for s in scenes],
    }
    return {a: max(v.count(x) for x in set(v)) / len(v) for a, v in values.items()}


def decode(pipe: StableDiffusionPipeline, latents: torch.Tensor) -> list[np.ndarray]:
    """Unscaled latents to RGB uint8 images."""
    images = pipe.vae.decode(latents).sample.permute(0, 2, 3, 1)
    return list(((images.clamp(-1, 1) + 1) * 127.5).round().byte().numpy())


@torch.no_grad()
def round_trip(pipe: StableDiffusionPipeline, scenes: list[Scene]) -> list[np.ndarray]:
    """The scenes' ground-truth images through the VAE's encoder (posterior mean) and decoder."""
    return decode(pipe, pipe.vae.encode(to_tensor(render(s) for s in scenes)).latent_dist.mean)


@torch.no_grad()
def first_step_layout(
    pipe: StableDiffusionPipeline, scenes: list[Scene], seed: int = 0
) -> list[np.ndarray]:
    """The clean image the model predicts from pure noise at the first sampling step, decoded.

    The terminal SNR is near zero, so this prediction is the model's layout for the caption
    before the noise has a say: where it puts the object is what the analyser should read.
    A model that cannot tell the corners apart predicts a copy in every corner. The model
    predicts v, so x0 = sqrt(alpha) * x - sqrt(1 - alpha) * v.
    """
    embeds, _ = pipe.encode_prompt([caption(s) for s in scenes], pipe.device, 1, False)
    t = pipe.scheduler.config.num_train_timesteps - 1
    alpha = pipe.scheduler.alphas_cumprod[t]
    side = SIZE // pipe.vae_scale_factor
    shape = (len(scenes), pipe.unet.config.in_channels, side, side)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    timesteps = torch.full((len(scenes),), t)
    v = pipe.unet(noise, timesteps, embeds).sample
    x0 = alpha.sqrt() * noise - (1 - alpha).sqrt() * v
    return decode(pipe, x0 / pipe.vae.config.scaling_factor)


def time_one(pipe: StableDiffusionPipeline, runs: int = 7) -> float:
    times = []
    for i in range(runs + 1):
        started = time.perf_counter()
        generate(pipe, ["a small red circle at the top left on a blue background"], [i])
        times.append(time.perf_counter() - started)
    return statistics.median(times[1:])  # the first call warms up allocations


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=MODEL_DIR)
    parser.add_argument("--sheet", type=Path, help="save the held-out images as one PNG")
    args = parser.parse_args(argv)

    pipe = load(args.model)
    held_out = eval_scenes(HELD_OUT, seed=1)
    seen_pairs = [(c, s) for c in OBJECT_COLOURS for s in SHAPES if (c, s) not in HELD_OUT]
    seen = eval_scenes(seen_pairs[::3], seed=2)
    seeds = [s.seed for s in held_out]

    images = generate(pipe, [caption(s) for s in held_out], seeds)
    rows = {
        "held-out captions": (accuracy(images, held_out), len(held_out)),
        "seen combinations": (
            accuracy(generate(pipe, [caption(s) for s in seen], [s.seed for s in seen]), seen),
            len(seen),
        ),
        "empty caption": (
            accuracy(generate(pipe, [""] * len(held_out), seeds), held_out),
            len(held_out),
        ),
        "chance (best blind guess)": (chance(held_out), len(held_out)),
    }
    if args.sheet:
        Image.fromarray(
            np.concatenate(
                [np.concatenate(images[i : i + 10], axis=1) for i in range(0, len(images), 10)]
            )
        ).save(args.sheet)

    print(f"{'':28}" + "".join(f"{a:>12}" for a in ATTRIBUTES) + "       n")
    for name, (acc, n) in rows.items():
        print(f"{name:28}" + "".join(f"{acc[a]:>11.1%} " for a in ATTRIBUTES) + f"{n:>8}")
    print(
        f"{'target (held-out)':28}"
        + "".join(
            f"{'>= ' + format(TARGETS[a], '.0%'):>12}" if a in TARGETS else f"{'-':>12}"
            for a in ATTRIBUTES
        )
    )
    held = rows["held-out captions"][0]
    print(
        "held-out targets met: "
        + ", ".join(f"{a} {'yes' if held[a] >= t else 'NO'}" for a, t in TARGETS.items())
    )

    prompts = [caption(s) for s in held_out[:10]]
    g1 = generate(pipe, prompts, seeds[:10], guidance=1.0)
    g5 = images[:10]
    diff = np.mean(
        [np.abs(a.astype(float) - b.astype(float)).mean() for a, b in zip(g1, g5, strict=True)]
    )
    print(
        f"guidance 1 vs {GUIDANCE:g}, same seeds: mean absolute pixel difference "
        f"{diff:.1f} / 255 over {len(prompts)} prompts"
    )
    placed = accuracy(first_step_layout(pipe, held_out), held_out)["position"]
    print(
        f"first-step layout (x0 predicted from pure noise): position {placed:.1%}"
        f" of {len(held_out)} held-out captions"
    )
    truth = [sample_scene(900_000 + i, two_objects=0) for i in range(40)]
    decoded = round_trip(pipe, truth)
    readable = sum(all(score(analyse(i), s).values()) for i, s in zip(decoded, truth, strict=True))
    print(f"VAE round trip: {readable} of {len(truth)} ground-truth scenes read fully correctly")
    print(
        f"one {SIZE}x{SIZE} image, {STEPS} steps, guidance {GUIDANCE:g}: "
        f"median {time_one(pipe):.3f} s of 7 ({torch.get_num_threads()} threads)"
    )


if __name__ == "__main__":
    main()
