"""1. Daemon overhead: one job through `sdbridge serve` + the pure-Python client, against the same
pipeline called directly in this process (same model, seed, steps and size, same threads).

The direct side does what a script would to get the same pixels: the pipeline call at the size
the engine generates at (learnt from the daemon's own previews: latent size x VAE factor), then
the resize to the requested size. All else the daemon does (validation, a scheduler per job,
progress events, the PNG file, encoding, transport, decoding in the client) is overhead. The raw
result must equal the direct pixels byte for byte, or the comparison is refused.
"""

from __future__ import annotations

import io
import time
from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from PIL import Image

from bench.common import (
    CACHE,
    PROMPT,
    Stats,
    default_model,
    load_direct,
    model_label,
    model_parser,
    report,
    set_threads,
    start_daemon,
    table,
)
from sdbridge.wire.client import Client

SEED = 1234


def wait_for_compression(result: dict, timeout: float = 30.0) -> None:
    """After sending a raw result the daemon compresses the PNG file it stored: wait for that, so
    the daemon's leftover work never slows the next run (its file shrinks below raw RGBA)."""
    image = result["images"][0]
    raw_size = image["width"] * image["height"] * 4
    deadline = time.perf_counter() + timeout
    while Path(image["path"]).stat().st_size >= raw_size and time.perf_counter() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)  # the worker's last steps after the replace


def direct_job(
    pipe: DiffusionPipeline, gen_size: tuple[int, int], size: int, steps: int
) -> tuple[float, Image.Image]:
    start = time.perf_counter()
    image = pipe(
        prompt=PROMPT,
        num_inference_steps=steps,
        guidance_scale=7.5,
        width=gen_size[0],
        height=gen_size[1],
        generator=[torch.Generator("cpu").manual_seed(SEED)],
    ).images[0]
    if image.size != (size, size):
        image = image.resize((size, size), Image.LANCZOS)
    if pipe.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, image


def daemon_job(client: Client, size: int, steps: int, output_format: str) -> dict[str, float]:
    """Seconds from submit to the result in hand, and how they split (client-side stamps)."""
    stamps: dict[str, float] = {}
    start = time.perf_counter()
    job = client.generate(
        prompt=PROMPT,
        num_inference_steps=steps,
        guidance_scale=7.5,
        seed=SEED,
        width=size,
        height=size,
        output_format=output_format,
    )
    job.subscribe(lambda event: stamps.setdefault(event["event"], time.perf_counter()))
    result = job.result(timeout=600)
    total = time.perf_counter() - start
    wait_for_compression(result)
    return {
        "total": total,
        "result": result,
        "before": stamps["started"] - start,
        # result.elapsed: from the job's start to its images, before the file and the encoding
        "after": total - (stamps["started"] - start) - result["elapsed"],
    }


def generation_size(client: Client, size: int, vae_factor: int) -> tuple[int, int]:
    """The size the daemon generates at for a ``size`` square, from the size of its preview."""
    job = client.generate(
        prompt=PROMPT, num_inference_steps=1, width=size, height=size, preview_every=1
    )
    preview = next(e for e in job.events(timeout=600) if e["event"] == "preview")["image"]
    return preview["width"] * vae_factor, preview["height"] * vae_factor


def pixels(result: dict) -> bytes:
    image = result["images"][0]
    if image["format"] == "raw":
        return bytes(image["data"])
    return Image.open(io.BytesIO(image["data"])).convert("RGBA").tobytes()


def calibrate_steps(pipe: DiffusionPipeline, native: int, target_s: float) -> int:
    """Steps that make a direct job at the native size take about ``target_s``."""
    square = (native, native)
    direct_job(pipe, square, native, 2)  # warm-up
    short, _ = direct_job(pipe, square, native, 2)
    long, _ = direct_job(pipe, square, native, 12)
    per_step = max((long - short) / 10, 1e-4)
    fixed = max(short - 2 * per_step, 0.0)
    return max(2, min(150, round((target_s - fixed) / per_step)))


def main() -> None:
    p = model_parser(__doc__.splitlines()[0], repeats=7, steps=None)  # None: --job-seconds
    p.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    p.add_argument("--formats", nargs="+", default=["raw", "png"])
    p.add_argument("--job-seconds", type=float, default=1.0, help="direct job length to aim at")
    p.add_argument("--device", default="cpu", help="cpu or cuda (fp16 there, as the engine)")
    args = p.parse_args()
    if args.quick:
        args.repeats, args.sizes, args.job_seconds = 2, [256], 0.2
    set_threads(args.threads)
    torch.set_num_threads(args.threads)
    model = args.model or default_model(args.native)
    pipe = load_direct(model, torch.float16 if args.device == "cuda" else torch.float32)
    pipe.to(args.device)
    native = pipe.unet.config.sample_size * pipe.vae_scale_factor
    steps = args.steps or calibrate_steps(pipe, native, args.job_seconds)
    print(
        f"model {model_label(model)} (native {native} px) on {args.device}, {steps} steps, "
        "CFG 7.5, "
        f"{args.threads} threads"
    )

    daemon = start_daemon(model, CACHE / "overhead", "--device", args.device)
    samples: dict[tuple[int, str], list[dict[str, float]]] = {}
    try:
        with Client(daemon.address, timeout=60) as client:
            configs = [(size, fmt) for size in args.sizes for fmt in args.formats]
            gen_sizes = {s: generation_size(client, s, pipe.vae_scale_factor) for s in args.sizes}
            for size, fmt in configs:  # warm-up, and the pixels must agree
                _, image = direct_job(pipe, gen_sizes[size], size, steps)
                result = daemon_job(client, size, steps, fmt)["result"]
                same = pixels(result) == image.convert("RGBA").tobytes()
                if not same and args.device == "cpu":
                    raise SystemExit(
                        f"{size} {fmt}: the daemon's pixels differ from the direct call"
                    )
                if not same:  # GPU kernels may pick other algorithms from run to run
                    print(f"{size} {fmt}: pixels differ from the direct call (GPU nondeterminism)")
            for repeat in range(args.repeats):
                for size, fmt in configs:
                    # Alternate which side goes first, so drift on a shared machine cancels out.
                    order = ("direct", "daemon") if repeat % 2 == 0 else ("daemon", "direct")
                    times = {}
                    for side in order:
                        if side == "direct":
                            times[side], _ = direct_job(pipe, gen_sizes[size], size, steps)
                        else:
                            times.update(daemon_job(client, size, steps, fmt))
                    samples.setdefault((size, fmt), []).append(times)
    finally:
        daemon.stop()

    rows, ratios = [], []
    for (size, fmt), runs in samples.items():
        ratio = Stats.of([r["total"] / r["direct"] for r in runs])
        ratios.append(ratio.median)
        rows.append(
            [
                f"{size}x{size} ({gen_sizes[size][0]}x{gen_sizes[size][1]})",
                fmt,
                Stats.of([r["direct"] for r in runs]).show(1e3, 0),
                Stats.of([r["total"] for r in runs]).show(1e3, 0),
                Stats.of([r["total"] - r["direct"] for r in runs]).show(1e3, 1),
                Stats.of([r["before"] for r in runs]).show(1e3, 1),
                Stats.of([r["after"] for r in runs]).show(1e3, 1),
                ratio.show(1, 3),
            ]
        )
    print(
        f"ms, median [min..max] over {args.repeats} paired runs. Of the daemon's time, 'to start' "
        "is submit -> started, 'after' is images made -> result in the client (PNG file, "
        "encoding, transport, decoding)"
    )
    table(
        [
            "size (generated)",
            "format",
            "direct",
            "daemon",
            "overhead",
            "to start",
            "after",
            "ratio",
        ],
        rows,
    )
    report("daemon_overhead_ratio", max(ratios))


if __name__ == "__main__":
    main()
