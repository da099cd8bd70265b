"""Few-step models get few-step defaults: recognised by scheduler or name, or set in the config."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers import Peer

from sdbridge.daemon.models import describe
from sdbridge.daemon.presets import PRESETS, JobDefaults, detect_preset, job_defaults, lora_preset

JOB = {"prompt": "a red circle on a blue background", "seed": 42}


@pytest.mark.parametrize(
    ("name", "scheduler", "preset"),
    [
        ("stabilityai/sd-turbo", "EulerDiscreteScheduler", "turbo"),
        ("sd_xl_turbo_1.0_fp16", "EulerAncestralDiscreteScheduler", "turbo"),
        ("sdxl_lightning_4step", "EulerDiscreteScheduler", "lightning"),
        ("Hyper-SD15-8steps", "DDIMScheduler", "lightning"),
        ("lcm-sdxl-turbo", "EulerDiscreteScheduler", "lcm"),
        ("dreamshaper-8", "LCMScheduler", "lcm"),  # an LCM distillation under any name
        ("dreamshaper-8", "PNDMScheduler", "standard"),
    ],
)
def test_presets_are_detected_from_scheduler_and_name(name, scheduler, preset) -> None:
    assert detect_preset(name, scheduler) == preset


def test_the_config_chooses_a_preset_and_overrides_fields() -> None:
    assert job_defaults("my-merge", "PNDMScheduler", {"preset": "turbo"}) == PRESETS["turbo"]
    tuned = job_defaults("sd-turbo", "EulerDiscreteScheduler", {"num_inference_steps": 1})
    assert tuned == JobDefaults(1, 0.0, "Euler a", "trailing")
    assert job_defaults("sd-turbo", "", {"preset": "standard"}) == JobDefaults()
    assert lora_preset(["styles/ink", "lcm-lora-sdv1-5"]) == "lcm"
    assert lora_preset(["styles/ink"]) is None


def test_the_models_op_shows_each_models_defaults(library_peer: Peer) -> None:
    listed = {entry["name"]: entry for entry in library_peer.answer("models")["models"]}
    assert listed["tiny-sd-turbo"]["defaults"] == PRESETS["turbo"].to_dict()
    assert listed["tiny-sd"]["defaults"] == JobDefaults().to_dict()


def test_a_turbo_job_without_steps_or_guidance_runs_the_few_step_defaults(
    library_peer: Peer,
) -> None:
    events = library_peer.generate(**JOB, model="tiny-sd-turbo")
    assert [e["step"] for e in events if e["event"] == "progress"] == [1, 2, 3, 4]
    parameters = events[-1]["parameters"]
    for part in ("Steps: 4", "Sampler: Euler a", "CFG scale: 0,"):
        assert part in parameters
    chosen = library_peer.generate(
        **JOB, model="tiny-sd-turbo", num_inference_steps=2, guidance_scale=1.5
    )
    assert [e["step"] for e in chosen if e["event"] == "progress"] == [1, 2]
    assert "CFG scale: 1.5," in chosen[-1]["parameters"]


def test_the_same_weights_under_a_standard_name_get_the_standard_defaults(
    library_peer: Peer,
) -> None:
    events = library_peer.generate(**JOB, model="tiny-sd")
    assert len([e for e in events if e["event"] == "progress"]) == 20
    assert "CFG scale: 7.5," in events[-1]["parameters"]


def test_an_lcm_folder_is_known_before_it_is_loaded(pipeline_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "my-merge"
    shutil.copytree(pipeline_dir, folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", "LCMScheduler"]
    (folder / "model_index.json").write_text(json.dumps(index))
    entry = describe(str(folder), "my-merge")
    assert entry.scheduler == "LCMScheduler"
    assert job_defaults(entry.name, entry.scheduler) == PRESETS["lcm"]
