"""LoRAs from the loras folder, applied per job at a weight and gone after it."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import Peer, result_image, wait_until
from safetensors.torch import load_file, save_file

JOB = {
    "prompt": "a red circle on a blue background",
    "num_inference_steps": 4,
    "seed": 42,
    "model": "tiny-sd",
}


def loras(peer: Peer) -> dict[str, dict]:
    return {entry["name"]: entry for entry in peer.answer("models")["loras"]}


def listed(peer: Peer, name: str) -> None:
    """Wait until a LoRA just put in the folder is listed (the `models` op rescans)."""
    wait_until(lambda: name in loras(peer))


@pytest.fixture(scope="module")
def base(library_daemon) -> np.ndarray:
    """The base model's image for JOB, before any LoRA was applied."""
    connection = Peer(library_daemon.address)
    try:
        return result_image(connection.generate(**JOB))
    finally:
        connection.close()


def image(library_peer: Peer, *loras: tuple[str, float]) -> np.ndarray:
    return result_image(
        library_peer.generate(**JOB, loras=[{"name": n, "weight": w} for n, w in loras])
    )


def test_weight_zero_is_the_base_model_and_weight_one_changes_the_image(library_peer, base) -> None:
    # Exact, though the LoRA layers run: weight 0 adds exact zeros to the base layers' outputs.
    assert np.array_equal(image(library_peer, ("ink", 0.0)), base)
    inked = image(library_peer, ("ink", 1.0))
    assert np.abs(inked - base).mean() > 1.0
    assert np.array_equal(image(library_peer, ("ink", 1.0)), inked)  # the same LoRA job again


def test_after_a_lora_job_the_base_model_gives_its_own_pixels_again(library_peer, base) -> None:
    loras = [{"name": "ink", "weight": 1.0}, {"name": "styles/paper", "weight": 0.8}]
    events = library_peer.generate(**JOB, loras=loras)
    # A1111's prompt tags: pasting the parameters into A1111 applies the same LoRAs.
    assert events[-1]["parameters"].startswith(
        f"{JOB['prompt']} <lora:ink:1> <lora:styles/paper:0.8>\n"
    )
    assert np.array_equal(result_image(library_peer.generate(**JOB)), base)


def test_several_loras_at_once_each_count(library_peer, base) -> None:
    ink = image(library_peer, ("ink", 1.0))
    paper = image(library_peer, ("styles/paper", 1.0))
    both = image(library_peer, ("ink", 1.0), ("styles/paper", 1.0))
    for single in (ink, paper):
        assert np.abs(both - single).mean() > 0.5


def test_a_kohya_lora_works_like_the_same_lora_in_diffusers_format(
    library_peer, library: Path, base
) -> None:
    """Most LoRAs on model sites are in kohya's format: `lora_unet_<module path with _>` with
    `lora_down`/`lora_up` and an `alpha` per module; diffusers converts them when loading."""
    state = load_file(str(library / "loras" / "ink.safetensors"))
    kohya = {}
    for key, tensor in state.items():
        match = re.fullmatch(r"unet\.(.+)\.lora_([AB])\.weight", key)
        assert match, key
        module = "lora_unet_" + match[1].replace(".", "_")
        kohya[f"{module}.lora_{'down' if match[2] == 'A' else 'up'}.weight"] = tensor
        if match[2] == "A":  # alpha = rank: scale 1, as peft's lora_alpha = r
            kohya[f"{module}.alpha"] = torch.tensor(float(tensor.shape[0]))
    path = library / "loras" / "kohya-ink.safetensors"
    save_file(kohya, str(path))
    try:
        listed(library_peer, "kohya-ink")
        assert (
            np.abs(
                image(library_peer, ("kohya-ink", 1.0)) - image(library_peer, ("ink", 1.0))
            ).max()
            <= 1
        )
    finally:
        path.unlink()


def test_the_models_op_and_hello_list_the_loras(library_peer, library: Path) -> None:
    # Rescans are at most once a second: LoRAs other tests added and removed may linger a moment.
    wait_until(lambda: set(loras(library_peer)) == {"ink", "styles/paper"})
    listed = loras(library_peer)
    size = (library / "loras" / "ink.safetensors").stat().st_size
    assert listed["ink"]["size_bytes"] == size
    hello = library_peer.answer("hello")
    assert set(hello["loras"]) == {"ink", "styles/paper"} and "loras" in hello["capabilities"]


@pytest.mark.parametrize(
    ("loras", "code"),
    [
        ([{"name": "no-such-lora"}], "unknown_lora"),
        ([{"name": "../loras/ink"}], "unknown_lora"),
        ([{"name": "ink", "weight": 11}], "out_of_range"),
        ([{"name": "ink", "weight": "1"}], "bad_type"),
        ([{"name": "ink", "strength": 1}], "unknown_field"),
        ([{"weight": 1}], "missing_field"),
        ([{"name": "ink"}] * 9, "out_of_range"),
        ("ink", "bad_type"),
    ],
)
def test_bad_loras_are_refused_before_the_job_is_queued(library_peer, loras, code: str) -> None:
    events = library_peer.generate(**JOB, loras=loras)
    assert [e["event"] for e in events] == ["error"]
    assert events[0]["code"] == code


def test_an_lcm_lora_brings_the_lcm_sampler_and_steps(library_peer, library: Path) -> None:
    lcm = library / "loras" / "lcm-lora-tiny.safetensors"
    shutil.copyfile(library / "loras" / "ink.safetensors", lcm)
    try:
        listed(library_peer, "lcm-lora-tiny")
        events = library_peer.generate(
            prompt="a cat", seed=1, model="tiny-sd", loras=[{"name": "lcm-lora-tiny"}]
        )
        assert len([e for e in events if e["event"] == "progress"]) == 4
        assert "Sampler: LCM," in events[-1]["parameters"]
        assert "CFG scale: 1," in events[-1]["parameters"]
    finally:
        lcm.unlink()


@pytest.mark.parametrize("kind", ["cut-off download", "link to a model checkpoint"])
def test_a_listed_lora_that_does_not_load_fails_its_job_and_the_model_serves_on(
    library_peer, library: Path, base, kind: str
) -> None:
    bad = library / "loras" / "bad.safetensors"
    if kind == "cut-off download":
        bad.write_bytes((library / "loras" / "ink.safetensors").read_bytes()[:200])
    else:
        bad.symlink_to(library / "models" / "tiny-sd-file.safetensors")
    try:
        listed(library_peer, "bad")
        events = library_peer.generate(**JOB, loras=[{"name": "bad"}])
        error = events[-1]
        assert (error["event"], error["code"], error["field"]) == (
            "error",
            "lora_load_failed",
            "loras",
        )
        assert "'bad'" in error["message"] and str(library) not in error["message"]
        assert np.array_equal(result_image(library_peer.generate(**JOB)), base)
    finally:
        bad.unlink()
