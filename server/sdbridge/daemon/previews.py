"""Cheap previews: a linear map from latent channels to RGB, fitted to each model's own VAE.

Decoding with the VAE every step costs far more than the step itself on small models; a 4x3
matrix (plus bias) applied to the latent costs well under a millisecond. The matrix differs per
VAE, so instead of shipping constants for a few known models we fit it once at load time by
encoding a handful of flat and graded colour images and solving least squares.
"""

from __future__ import annotations

import torch

CALIBRATION_SIZE = 64


def _calibration_images(generator: torch.Generator) -> torch.Tensor:
    """Flat colours and horizontal/vertical blends in [-1, 1], shape (N, 3, S, S)."""
    size = CALIBRATION_SIZE
    colours = torch.rand(12, 3, generator=generator) * 2 - 1
    flat = colours[:8, :, None, None].expand(8, 3, size, size)
    ramp = torch.linspace(0, 1, size)
    a, b = colours[8:10, :, None, None], colours[10:12, :, None, None]
    horizontal = (a + (b - a) * ramp.view(1, 1, 1, -1)).expand(2, 3, size, size)
    vertical = (a + (b - a) * ramp.view(1, 1, -1, 1)).expand(2, 3, size, size)
    return torch.cat([flat, horizontal, vertical]).contiguous()


class LatentPreviewer:
    """Turns latents (B, C, h, w) into small RGBA8 images at latent resolution."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        self.weight = weight  # (C, 3)
        self.bias = bias  # (3,)

    @classmethod
    @torch.no_grad()
    def fit(cls, vae: torch.nn.Module) -> LatentPreviewer:
        param = next(vae.parameters())
        images = _calibration_images(torch.Generator().manual_seed(0))
        latents = vae.encode(images.to(param.device, param.dtype)).latent_dist.mean.float().cpu()
        scale = getattr(vae.config, "scaling_factor", 1.0)
        latents = latents * scale
        target = torch.nn.functional.interpolate(images, size=latents.shape[-2:], mode="area")
        channels = latents.shape[1]
        x = latents.permute(0, 2, 3, 1).reshape(-1, channels)
        x = torch.cat([x, torch.ones(len(x), 1)], dim=1)
        y = target.permute(0, 2, 3, 1).reshape(-1, 3)
        solution = torch.linalg.lstsq(x, y).solution
        return cls(solution[:channels], solution[channels])

    @torch.no_grad()
    def to_rgba(self, latents: torch.Tensor) -> tuple[int, int, bytes]:
        """The first image of the batch as (width, height, RGBA bytes)."""
        latent = latents[0, : self.weight.shape[0]].float().cpu()
        rgb = torch.einsum("chw,cd->hwd", latent, self.weight) + self.bias
        rgb = ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        height, width = rgb.shape[:2]
        alpha = torch.full((height, width, 1), 255, dtype=torch.uint8)
        return width, height, torch.cat([rgb, alpha], dim=2).numpy().tobytes()
