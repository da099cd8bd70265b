"""The engine's acceleration modes: chosen by environment, applied in place, outputs kept close."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel
from pipelines import build_unet

from sdbridge.daemon import acceleration


def _unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return build_unet().eval()


def test_mode_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(acceleration.ENV, raising=False)
    assert acceleration.mode_from_env() == acceleration.DEFAULT == "off"
    monkeypatch.setenv(acceleration.ENV, " BF16 ")
    assert acceleration.mode_from_env() == "bf16"
    monkeypatch.setenv(acceleration.ENV, "turbo")
    with pytest.raises(ValueError, match="turbo"):
        acceleration.mode_from_env()


@torch.no_grad()
def test_bf16_keeps_the_module_its_dtype_and_the_output_close() -> None:
    unet = _unet()
    sample, text = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 32)
    expected = unet(sample, 10, text).sample
    assert acceleration.accelerate_unet(unet, "bf16") is unet
    first = unet(sample, 10, text, return_dict=False)[0]
    again = unet(sample, 10, text).sample
    assert first.dtype == again.dtype == torch.float32 and torch.equal(first, again)
    assert ((first - expected).norm() / expected.norm()).item() < 5e-2
    assert next(unet.parameters()).dtype == torch.float32


@torch.no_grad()
def test_bf16_follows_weights_changed_in_place() -> None:
    unet = acceleration.accelerate_unet(_unet(), "bf16")
    sample, text = torch.randn(1, 4, 8, 8), torch.randn(1, 5, 32)
    before = unet(sample, 10, text).sample
    unet.conv_out.weight.mul_(2)
    assert not torch.allclose(unet(sample, 10, text).sample, before)
