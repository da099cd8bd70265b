"""Speed-ups for a loaded model's UNet, applied once at load time.

Each mode was measured against diffusers' defaults by `bench/unet.py` (CPU) and `bench/gpu.py`
(GPU), speed and output difference side by side; docs/benchmarks.md has the numbers. The mode
comes from $SDBRIDGE_ACCELERATE:

- `off` (the default): diffusers' defaults. On the 2-core development CPU nothing exact won:
  fused QKV projections, channels_last, the math SDPA kernel and a frozen TorchScript trace were
  all within noise of it or slower.
- `bf16`: the UNet computes in bfloat16 (autocast) while its weights, the scheduler, the text
  encoder and the VAE stay as loaded. Convolutions and matrix products run about twice as fast
  on CPUs with native bf16 (AVX512-BF16, AMX); the noise prediction moves by ~1e-2 (relative),
  so images differ slightly from fp32 ones (still the same for the same seed).
- `compile`: `torch.compile` (inductor, weights frozen as constants on CPU). The first job at each
  new size compiles for minutes on a small CPU; worth it only on a long-running GPU daemon.

The UNet object itself stays in place (its forward is wrapped or compiled in place), so pipelines
sharing it through `from_pipe` and LoRA loading keep working.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import torch
from diffusers import DiffusionPipeline, ModelMixin

ENV = "SDBRIDGE_ACCELERATE"
MODES = ("off", "bf16", "compile")
DEFAULT = "off"


def mode_from_env() -> str:
    mode = os.environ.get(ENV, DEFAULT).strip().lower() or DEFAULT
    if mode not in MODES:
        raise ValueError(f"${ENV}={mode!r}: choose one of {', '.join(MODES)}")
    return mode


def _autocast_forward(forward: Callable[..., Any], device: str, dtype: torch.dtype) -> Callable:
    @functools.wraps(forward)
    def run(*args: Any, **kwargs: Any) -> Any:
        with torch.autocast(device, dtype=torch.bfloat16):
            output = forward(*args, **kwargs)
        # The scheduler steps in the latents' own precision: hand back what the UNet was loaded in.
        if isinstance(output, tuple):
            return tuple(x.to(dtype) if isinstance(x, torch.Tensor) else x for x in output)
        output.sample = output.sample.to(dtype)
        return output

    return run


def accelerate(pipe: DiffusionPipeline, mode: str) -> None:
    """Apply ``mode`` to the pipeline's denoiser (UNet or transformer): what runs every step."""
    denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    if denoiser is not None:
        accelerate_unet(denoiser, mode)


def accelerate_unet(unet: ModelMixin, mode: str) -> ModelMixin:
    """Apply ``mode`` to ``unet`` (any diffusers denoiser) in place and return it."""
    if mode == "bf16":
        unet.forward = _autocast_forward(unet.forward, unet.device.type, unet.dtype)
    elif mode == "compile":
        if unet.device.type == "cpu":
            import torch._inductor.config as inductor

            inductor.freezing = True  # weights as constants: folded and prepacked for oneDNN
        unet.compile()
    elif mode != "off":
        raise ValueError(f"unknown acceleration mode {mode!r}; choose one of {', '.join(MODES)}")
    return unet
