"""5. The UNet step: the Stable Diffusion 1.5 UNet (its published architecture, random weights)
with classifier-free guidance (batch 2), fp32 on this CPU: diffusers' defaults against each
candidate for the engine's own path, paired and interleaved, with ||a - b|| / ||b|| beside it."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from contextlib import nullcontext

import torch
from diffusers import UNet2DConditionModel

from bench.common import Stats, parser, report, set_threads, table

# runwayml/stable-diffusion-v1-5 unet/config.json, written out (859.5M parameters).
SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    center_input_sample=False,
    flip_sin_to_cos=True,
    freq_shift=0,
    down_block_types=(
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    downsample_padding=1,
    mid_block_scale_factor=1,
    act_fn="silu",
    norm_num_groups=32,
    norm_eps=1e-5,
    cross_attention_dim=768,
    attention_head_dim=8,
)
TARGET_SPEEDUP, TARGET_ERROR = 1.3, 1e-2

Inputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
Step = Callable[[Inputs], torch.Tensor]


def sd15_unet(**overrides: object) -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(**{**SD15_UNET, **overrides}).eval().requires_grad_(False)


def inputs(latent: int, generator: torch.Generator) -> Inputs:
    sample = torch.randn(2, 4, latent, latent, generator=generator)
    timestep = torch.tensor(500.0)
    text = torch.randn(2, 77, 768, generator=generator)
    return sample, timestep, text


def plain(unet: torch.nn.Module, context: Callable[[], object] = nullcontext) -> Step:
    def step(x: Inputs) -> torch.Tensor:
        with context():
            return unet(*x, return_dict=False)[0].float()

    return step


# Each candidate: (name, build(unet) -> step). Builds that copy the UNet free it when replaced.
def fused(unet: UNet2DConditionModel) -> Step:
    unet = copy.deepcopy(unet)
    unet.fuse_qkv_projections()
    return plain(unet)


def channels_last(unet: UNet2DConditionModel) -> Step:
    unet = copy.deepcopy(unet).to(memory_format=torch.channels_last)
    inner = plain(unet)
    return lambda x: inner((x[0].contiguous(memory_format=torch.channels_last), x[1], x[2]))


def sdpa_math(unet: UNet2DConditionModel) -> Step:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return plain(unet, lambda: sdpa_kernel([SDPBackend.MATH]))


def bf16_weights(unet: UNet2DConditionModel) -> Step:
    unet = copy.deepcopy(unet).to(torch.bfloat16)
    return lambda x: unet(x[0].bfloat16(), x[1], x[2].bfloat16(), return_dict=False)[0].float()


def engine(mode: str) -> Callable[[UNet2DConditionModel], Step]:
    """The engine's own path: `sdbridge.daemon.acceleration`, applied as at load time."""

    def build(unet: UNet2DConditionModel) -> Step:
        from sdbridge.daemon import acceleration

        return plain(acceleration.accelerate_unet(copy.deepcopy(unet), mode))

    return build


def jit_frozen(unet: UNet2DConditionModel, example: Inputs) -> Step:
    class Wrapped(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.unet = unet

        def forward(
            self, sample: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor
        ) -> torch.Tensor:
            return self.unet(sample, timestep, text, return_dict=False)[0]

    traced = torch.jit.trace(Wrapped().eval(), example, check_trace=False)
    frozen = torch.jit.optimize_for_inference(torch.jit.freeze(traced))
    return lambda x: frozen(*x)


def timed(step: Step, x: Inputs) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    out = step(x)
    return time.perf_counter() - start, out


def error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def main() -> None:
    p = parser(__doc__.splitlines()[0], repeats=3)
    p.add_argument("--latents", type=int, nargs="+", default=[32, 64], help="32: 256 px, 64: 512")
    p.add_argument(
        "--variants",
        nargs="+",
        default=["engine:bf16", "fused", "channels_last", "sdpa_math", "jit", "bf16_weights"],
        help="also engine:compile (inductor; minutes to compile here)",
    )
    args = p.parse_args()
    set_threads(args.threads)
    torch.set_num_threads(args.threads)
    overrides: dict[str, object] = {}
    if args.quick:  # the same architecture, narrower: a smoke test of the script
        overrides = dict(block_out_channels=(32, 64, 64, 64), cross_attention_dim=768)
        args.repeats, args.latents = 2, [16]
    base = sd15_unet(**overrides)
    params = sum(p.numel() for p in base.parameters())
    print(
        f"SD 1.5 UNet{' (narrowed: --quick)' if overrides else ''}: {params / 1e6:.1f}M "
        f"parameters, fp32, CFG batch 2, {args.threads} threads; each candidate timed in "
        f"turn with the defaults, median [min..max] over {args.repeats} pairs"
    )
    reference = plain(base)
    builders: dict[str, Callable[[Inputs], Step]] = {
        "fused": lambda x: fused(base),
        "channels_last": lambda x: channels_last(base),
        "sdpa_math": lambda x: sdpa_math(base),
        "bf16_weights": lambda x: bf16_weights(base),
        "jit": lambda x: jit_frozen(base, x),
    }
    builders.update({f"engine:{m}": lambda x, m=m: engine(m)(base) for m in ("bf16", "compile")})
    rows: list[list[str]] = []
    within: dict[int, list[tuple[float, str]]] = {}  # per latent: candidates within the error
    with torch.no_grad():
        for latent in args.latents:
            x = inputs(latent, torch.Generator().manual_seed(latent))
            seconds, expected = timed(reference, x)  # warm-up
            for name in args.variants:
                start = time.perf_counter()
                candidate = builders[name](x)
                setup, out = timed(candidate, x)  # first call: compiles, traces, warms up
                setup += time.perf_counter() - start - setup
                diff = error(out, expected)
                pairs = []
                for repeat in range(args.repeats):
                    order = (reference, candidate) if repeat % 2 == 0 else (candidate, reference)
                    times = {id(step): timed(step, x)[0] for step in order}
                    pairs.append((times[id(reference)], times[id(candidate)]))
                default_s = Stats.of([a for a, _ in pairs])
                speedup = Stats.of([a / b for a, b in pairs])
                rows.append(
                    row := [
                        f"{latent * 8} px",
                        name,
                        default_s.show(1, 2),
                        Stats.of([b for _, b in pairs]).show(1, 2),
                        speedup.show(1, 2),
                        f"{diff:.1e}",
                        f"{setup:.1f}",
                    ]
                )
                print("  ".join(row), flush=True)  # a long run shows its progress
                if diff <= TARGET_ERROR:
                    within.setdefault(latent, []).append((speedup.median, name))
                del candidate
    table(
        ["size", "candidate", "defaults s", "candidate s", "speed-up", "||a-b||/||b||", "setup s"],
        rows,
    )
    print(f"target: speed-up >= {TARGET_SPEEDUP} at ||a-b||/||b|| <= {TARGET_ERROR}")
    largest = max(args.latents)
    speedup, name = max(within.get(largest, [(1.0, "defaults")]))
    print(f"fastest within {TARGET_ERROR} at {largest * 8} px: {name}")
    report("unet_best_speedup_within_1e-2", speedup)


if __name__ == "__main__":
    main()
