"""Speed-ups for a loaded model's denoiser, applied once at load time.

Each mode was measured against diffusers' defaults by `bench/unet.py` (CPU) and `bench/gpu.py`
(GPU), speed and output difference side by side; docs/benchmarks.md has the numbers. The mode
comes from $SDBRIDGE_ACCELERATE:

- `off` (the default): diffusers' defaults. On the 2-core development CPU nothing exact won:
  fused QKV projections, channels_last, the math SDPA kernel and a frozen TorchScript trace were
  all within noise of the defaults or slower.
- `bf16`: the convolutions compute in bfloat16 (oneDNN accumulates in fp32) from a bf16 copy of
  their weights (memory: half of theirs again); attention, linear layers, normalisation, the
  scheduler, the text encoder and the VAE keep their dtype. On CPUs with native bf16
  (AVX512-BF16, AMX) the SD 1.5 UNet ran 1.56x faster at 9.3e-3 relative difference in the
  noise prediction (bf16 autocast of the whole UNet moved it by 1.2e-2). Images differ slightly
  from fp32 ones (and stay the same for the same seed).
- `compile`: `torch.compile` (inductor, weights frozen as constants on CPU). The first job at each
  new size compiles for minutes on a small CPU; worth it only on a long-running GPU daemon.

The denoiser object stays in place (convolutions' forwards are replaced, or it is compiled in
place), so pipelines sharing it through `from_pipe` and LoRA adapters keep working.
"""

from __future__ import annotations

import os

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


class _Bf16Convolution:
    """A convolution's forward in bfloat16, with a bf16 copy of its weights made once: casting
    them on every call costs as much as the bf16 arithmetic saves. The copy is remade when the
    weights change in place (LoRA adapters wrap the layer instead and need no remaking)."""

    def __init__(self, conv: torch.nn.Conv2d) -> None:
        self.conv = conv
        self.key: tuple[int, int] | None = None
        self.weight = self.bias = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.conv
        key = (conv.weight.data_ptr(), conv.weight._version)
        if key != self.key:
            self.key = key
            self.weight = conv.weight.detach().to(torch.bfloat16)
            self.bias = None if conv.bias is None else conv.bias.detach().to(torch.bfloat16)
        return conv._conv_forward(x.to(torch.bfloat16), self.weight, self.bias).to(x.dtype)


def accelerate(pipe: DiffusionPipeline, mode: str) -> None:
    """Apply ``mode`` to the pipeline's denoiser (UNet or transformer): what runs every step."""
    denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    if denoiser is not None:
        accelerate_unet(denoiser, mode)


def accelerate_unet(unet: ModelMixin, mode: str) -> ModelMixin:
    """Apply ``mode`` to ``unet`` (any diffusers denoiser) in place and return it."""
    if mode == "bf16":
        for conv in [m for m in unet.modules() if isinstance(m, torch.nn.Conv2d)]:
            conv.forward = _Bf16Convolution(conv)
    elif mode == "compile":
        if unet.device.type == "cpu":
            import torch._inductor.config as inductor

            inductor.freezing = True  # weights as constants: folded and prepacked for oneDNN
        unet.compile()
    elif mode != "off":
        raise ValueError(f"unknown acceleration mode {mode!r}; choose one of {', '.join(MODES)}")
    return unet
