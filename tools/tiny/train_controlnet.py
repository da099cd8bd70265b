"""Train the embedded model's ControlNet: a scribble decides where the object goes.

    python -m tools.tiny.train_controlnet [--model DIR] [--out DIR] [--minutes-budget 55]

The embedded model (text encoder, UNet, VAE) stays frozen; a `ControlNetModel` copied from its
UNet (`from_unet`) learns, on scenes with one object centred anywhere, to put the object where
a control image marks it: a rough blob, an outline or a few strokes (`scribbles.py`), as the
daemon's `scribble` preprocessor makes them of a control layer. Captions name no place (the
control image gives it) and leave out size at times, and the background where it is the one a
caption without one means (white, black behind a white object), as the model's own captions. The
scenes are encoded once per aspect bucket, as for the model itself (`train.encode_pool`).
--init DIR trains on from a ControlNet made for an earlier version of the model (one trained on
from the model it steered) instead of starting from the UNet's copy.
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import ControlNetModel, StableDiffusionPipeline
from diffusers.models.attention_processor import AttnProcessor

from sdbridge.tiny import MODEL_DIR

from .scenes import LEFT_OUT, caption, render, sample_free_scene
from .scribbles import scribble, silhouette
from .tokenizer import MAX_LENGTH
from .train import (
    HIGH_NOISE_FRACTION,
    HIGH_NOISE_START,
    PLAIN_SHARE,
    build_noise_scheduler,
    encode_pool,
    lr_at,
    params,
    run_phase,
)

CONTROLNET_DIR = MODEL_DIR.parent / "controlnet"
CAPTION_DROPOUT = 0.1
# Scenes whose object is a free form: a scribble of any form, not only the four shapes', gets
# the object painted over it (a first run without them: IoU >= 0.6 for 0 of 12 diagonal bars).
FREE_FORM = 0.35
# Narrower than diffusers' default (16, 32, 96, 256): the control image is a flat mask.
EMBEDDING_CHANNELS = (16, 32, 64, 64)


def control_batch(scenes: list, rng: np.random.Generator) -> torch.Tensor:
    """Control images (B x 3 x H x W, 0..1, as the ControlNet pipelines feed them) of the scenes."""
    images = [scribble(silhouette(scene, render(scene)), rng) for scene in scenes]
    array = np.stack(images).astype(np.float32) / 255
    return torch.from_numpy(array)[:, None].repeat(1, 3, 1, 1)


def train(
    pipe: StableDiffusionPipeline, net: ControlNetModel, steps: int, seconds: float | None, pool
) -> tuple[int, float]:
    unet, text_encoder, tokenizer = pipe.unet, pipe.text_encoder, pipe.tokenizer
    noise_scheduler = build_noise_scheduler()
    alphas = noise_scheduler.alphas_cumprod
    snr = alphas / (1 - alphas)
    scale = pipe.vae.config.scaling_factor
    rng = np.random.default_rng(6)
    generator = torch.Generator().manual_seed(6)
    opt = torch.optim.AdamW(net.parameters(), lr=5e-4, weight_decay=0.0, fused=True)
    shares = np.array([len(b.scenes) for b in pool.buckets], dtype=np.float64)
    shares /= shares.sum()
    batch = 16

    def step_fn(step: int, progress: float) -> float:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, progress, 5e-4)
        bucket = pool.buckets[int(rng.choice(len(pool.buckets), p=shares))]
        index = torch.from_numpy(rng.integers(0, len(bucket.scenes), size=batch))
        scenes = [bucket.scenes[i] for i in index.tolist()]
        sample = torch.randn((batch, *bucket.means.shape[1:]), generator=generator)
        latents = (bucket.means[index] + bucket.stds[index] * sample) * scale
        cond = control_batch(scenes, rng)  # not flipped, as in train.py
        texts = [
            ""
            if rng.random() < CAPTION_DROPOUT
            else caption(
                s,
                size=rng.random() > 0.3,
                position=False,
                background=not (s.plain() and rng.random() < LEFT_OUT),
            )
            for s in scenes
        ]
        ids = tokenizer(
            texts, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt"
        ).input_ids
        t = torch.randint(0, 1000, (batch,), generator=generator)
        high = torch.rand(batch, generator=generator) < HIGH_NOISE_FRACTION
        t = torch.where(high, HIGH_NOISE_START + t % (1000 - HIGH_NOISE_START), t)
        noise = torch.randn(latents.shape, generator=generator)
        noisy = noise_scheduler.add_noise(latents, noise, t)
        target = noise_scheduler.get_velocity(latents, noise, t)
        with torch.no_grad():
            context = text_encoder(ids)[0]
        down, mid = net(noisy, t, context, controlnet_cond=cond, return_dict=False)
        pred = unet(
            noisy,
            t,
            context,
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
        ).sample
        weight = torch.clamp(5.0 / (snr[t] + 1), max=1.0)  # as train.py's diffusion loss
        loss = (weight * (pred - target).pow(2).mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        return loss.item()

    net.train()
    result = run_phase(step_fn, steps, seconds, "controlnet")
    net.eval()
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=MODEL_DIR, help="the model it steers")
    parser.add_argument("--out", type=Path, default=CONTROLNET_DIR)
    parser.add_argument("--minutes-budget", type=float, default=None)
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument(
        "--init", type=Path, default=None, help="train on from this ControlNet folder"
    )
    parser.add_argument("--pool", type=int, default=4096, help="scenes encoded once")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    started = time.monotonic()
    budget = None if args.minutes_budget is None else args.minutes_budget * 60
    pipe = StableDiffusionPipeline.from_pretrained(args.model)
    for module in (pipe.vae, pipe.text_encoder, pipe.unet):
        module.requires_grad_(False).eval()
    # As in train.py: the plain attention trains faster with these narrow heads.
    pipe.unet.set_attn_processor(AttnProcessor())
    if args.init is None:
        net = ControlNetModel.from_unet(
            pipe.unet, conditioning_embedding_out_channels=EMBEDDING_CHANNELS
        )
    else:
        net = ControlNetModel.from_pretrained(args.init)
    net.set_attn_processor(AttnProcessor())
    print(f"params: controlnet {params(net):,}", flush=True)
    pool = encode_pool(
        pipe.vae,
        args.pool,
        None if budget is None else 0.08 * budget,
        functools.partial(sample_free_scene, free_form=FREE_FORM, plain=PLAIN_SHARE),
    )
    remaining = None if budget is None else max(60.0, budget - (time.monotonic() - started) - 30)
    steps, seconds = train(pipe, net, args.steps, remaining, pool)
    args.out.mkdir(parents=True, exist_ok=True)
    net.save_pretrained(args.out, safe_serialization=True)
    info = {
        "steers": json.loads((args.model / "sdbridge.json").read_text())["name"],
        "preprocessor": "scribble",
        "training": {
            "init": None if args.init is None else str(args.init),
            "steps": steps,
            "seconds": round(seconds),
            "pool": len(pool.scenes),
            "total_seconds": round(time.monotonic() - started),
            "threads": args.threads,
        },
        "params": params(net),
    }
    (args.out / "sdbridge.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"saved to {args.out} after {(time.monotonic() - started) / 60:.1f} min", flush=True)


if __name__ == "__main__":
    main()
