"""7. On a GPU (a lent H100): the SD 1.5 architecture (UNet, VAE, CLIP text encoder; random
weights, fp16) at 512x512, 30 steps, CFG 7.5: it/s with diffusers' defaults and with each of the
engine's acceleration modes, the utilisation against the FLOP floor, and the daemon overhead.

Run by bench/gpu.sh, which brings the packages the GPU machine lacks. Everything is built here:
nothing is downloaded.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPTextConfig, CLIPTextModel

from bench.common import CACHE, PROMPT, REPO, quiet, report, table
from bench.unet import sd15_unet
from sdbridge.daemon import acceleration

# H100 SXM dense fp16/bf16 tensor-core peak (NVIDIA's datasheet, without sparsity).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12}
STEPS, SIZE = 30, 512


def sd15_pipeline(folder: Path) -> StableDiffusionPipeline:
    """SD 1.5's three networks at their published sizes, random weights, saved for the daemon."""
    from pipelines import write_tokenizer

    tokenizer = write_tokenizer(folder / "_tokenizer_source")
    tokenizer.model_max_length = 77
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        sample_size=512,
        scaling_factor=0.18215,
    )
    scheduler = PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        skip_prk_steps=True,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=sd15_unet(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    ).to(dtype=torch.float16)
    pipe.save_pretrained(folder)
    return pipe


def iterations_per_second(pipe: StableDiffusionPipeline, repeats: int) -> tuple[float, float]:
    """Denoising it/s (between the first and the last step's end) and the whole call's seconds."""
    rates, totals = [], []
    stamps: list[float] = []

    def stamp(
        pipe: StableDiffusionPipeline, step: int, timestep: torch.Tensor, tensors: dict
    ) -> dict:
        torch.cuda.synchronize()
        stamps.append(time.perf_counter())
        return {}

    for _ in range(repeats + 1):  # the first call warms up (and compiles)
        stamps.clear()
        torch.cuda.synchronize()
        start = time.perf_counter()
        pipe(PROMPT, num_inference_steps=STEPS, width=SIZE, height=SIZE, callback_on_step_end=stamp)
        torch.cuda.synchronize()
        totals.append(time.perf_counter() - start)
        rates.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
    return statistics.median(rates[1:]), statistics.median(totals[1:])


def unet_flops(pipe: StableDiffusionPipeline) -> float:
    """FLOPs of one UNet call with classifier-free guidance (batch 2) at 64x64 latents."""
    latent = SIZE // pipe.vae_scale_factor
    sample = torch.randn(2, 4, latent, latent, device="cuda", dtype=torch.float16)
    text = torch.randn(2, 77, 768, device="cuda", dtype=torch.float16)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        pipe.unet(sample, 500, text)
    return float(counter.get_total_flops())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--modes", nargs="+", default=[m for m in acceleration.MODES if m != "off"])
    p.add_argument("--skip-daemon", action="store_true")
    args = p.parse_args()
    quiet()
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_FLOPS.items() if k in name), None)
    print(f"{name}, torch {torch.__version__}, fp16, {SIZE}x{SIZE}, {STEPS} steps, CFG 7.5")
    folder = CACHE / "sd15-random"
    pipe = sd15_pipeline(folder).to("cuda")
    pipe.set_progress_bar_config(disable=True)
    flops = unet_flops(pipe)
    print(f"UNet with CFG: {flops / 1e12:.2f} TFLOP per step (counted)")
    rows = []
    base_rate, base_total = iterations_per_second(pipe, args.repeats)
    results = {"diffusers defaults": (base_rate, base_total, 0.0)}
    original = pipe.unet
    for mode in args.modes:  # each mode on a fresh copy: the engine applies them in place
        start = time.perf_counter()
        pipe.unet = acceleration.accelerate_unet(copy.deepcopy(original), mode)
        rate, total = iterations_per_second(pipe, args.repeats)
        results[f"engine: {mode}"] = (rate, total, time.perf_counter() - start)
        pipe.unet = original
        torch.cuda.empty_cache()
    for label, (rate, total, setup) in results.items():
        utilisation = f"{rate * flops / peak:.1%}" if peak else "?"
        rows.append(
            [
                label,
                f"{rate:.2f}",
                f"{rate / base_rate:.2f}",
                f"{total:.2f}",
                utilisation,
                f"{setup:.0f}",
            ]
        )
    table(["path", "it/s", "vs defaults", "s per image", "of fp16 peak", "setup s"], rows)
    best = max(rate for rate, _, _ in results.values())
    if not args.skip_daemon:
        del pipe, original
        torch.cuda.empty_cache()
        command = [
            sys.executable,
            "-m",
            "bench.overhead",
            "--model",
            str(folder),
            "--device",
            "cuda",
            "--sizes",
            str(SIZE),
            "--steps",
            str(STEPS),
            "--repeats",
            "5",
        ]
        subprocess.run(command, cwd=REPO, check=True)
    report("gpu_best_it_per_s", best)


if __name__ == "__main__":
    main()
