"""Samplers by their AUTOMATIC1111 names: built over the model's own noise schedule, chosen per
job, named in the PNG metadata."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler
from helpers import Peer, result_image
from PIL import Image

from sdbridge.daemon.schedulers import NAMES, SAMPLERS, build_scheduler, sampler_name

JOB = {
    "prompt": "a red circle on a blue background",
    "num_inference_steps": 6,
    "seed": 42,
    "model": "tiny-sd",
}
# An SD 1.5-like schedule, with options a model's own config may carry and a sampler must reset.
MODEL_CONFIG = EulerDiscreteScheduler(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    steps_offset=1,
    prediction_type="v_prediction",
    use_karras_sigmas=True,
).config


@pytest.mark.parametrize("name", NAMES)
def test_every_name_builds_over_the_models_schedule_and_names_itself_back(name: str) -> None:
    scheduler = build_scheduler(name, MODEL_CONFIG)
    assert isinstance(scheduler, SAMPLERS[name].scheduler)
    assert sampler_name(scheduler) == name
    # The model's schedule stays: a v-prediction model must not be sampled as epsilon.
    assert scheduler.config.prediction_type == "v_prediction"
    assert scheduler.config.beta_schedule == "scaled_linear"
    scheduler.set_timesteps(6)
    assert len(scheduler.timesteps) >= 6


def test_karras_and_sde_variants_are_really_configured() -> None:
    plain = build_scheduler("DPM++ 2M", MODEL_CONFIG)
    karras = build_scheduler("DPM++ 2M Karras", MODEL_CONFIG)
    sde = build_scheduler("DPM++ 2M SDE", MODEL_CONFIG)
    assert plain.config.use_karras_sigmas is False  # reset, though the model's config has it on
    assert karras.config.use_karras_sigmas is True
    assert sde.config.algorithm_type == "sde-dpmsolver++"
    plain.set_timesteps(10)
    karras.set_timesteps(10)
    assert not np.allclose(plain.sigmas.numpy(), karras.sigmas.numpy())


def test_a_scheduler_outside_the_table_keeps_its_class_name() -> None:
    assert (
        sampler_name(DPMSolverMultistepScheduler(solver_order=3)) == "DPMSolverMultistepScheduler"
    )
    assert sampler_name(EulerDiscreteScheduler(use_karras_sigmas=True)) == "EulerDiscreteScheduler"


def test_hello_lists_the_scheduler_names(library_peer: Peer) -> None:
    assert library_peer.answer("hello")["schedulers"] == NAMES


def test_a_job_samples_with_the_named_scheduler_and_the_png_says_so(library_peer: Peer) -> None:
    default = library_peer.generate(**JOB)
    chosen = library_peer.generate(**JOB, scheduler="DPM++ 2M Karras", output_format="png")
    again = library_peer.generate(**JOB, scheduler="DPM++ 2M Karras", output_format="png")
    assert "Sampler: Euler," in default[-1]["parameters"]  # the model's own scheduler
    assert "Sampler: DPM++ 2M Karras," in chosen[-1]["parameters"]
    with Image.open(Path(chosen[-1]["images"][0]["path"])) as png:
        assert "Sampler: DPM++ 2M Karras," in png.text["parameters"]
    assert chosen[-1]["images"][0]["data"] == again[-1]["images"][0]["data"]
    euler_a = result_image(library_peer.generate(**JOB, scheduler="Euler a"))
    assert np.abs(result_image(default) - euler_a).mean() > 1.0


def test_an_unknown_scheduler_is_refused_by_name(library_peer: Peer) -> None:
    events = library_peer.generate(**JOB, scheduler="DPM++ 9M")
    assert [e["event"] for e in events] == ["error"]
    assert (events[0]["code"], events[0]["field"]) == ("unknown_scheduler", "scheduler")
    assert "DPM++ 2M Karras" in events[0]["message"]
