"""The `sdbridge` command as a user types it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import free_port, sdbridge, wait_until
from PIL import Image

from sdbridge.cli import main


def test_generate_writes_the_image_and_shows_progress(daemon, tmp_path: Path) -> None:
    out = tmp_path / "cat.png"
    run = sdbridge(
        "generate", "a cat", "--address", daemon.address, "--steps", "6", "--seed", "5",
        "--width", "96", "--height", "64", "-o", str(out),
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "step 6/6" in run.stderr and "ETA" in run.stderr
    assert "seed 5" in run.stdout
    daemon_copy = Path(run.stdout.split("saved by the daemon as ")[1].rstrip(")\n"))
    with Image.open(out) as image, Image.open(daemon_copy) as copy:
        assert image.size == (96, 64)
        # The same pixels and the same A1111 parameters as the daemon's own copy.
        assert image.convert("RGB").tobytes() == copy.convert("RGB").tobytes()
        assert image.text["parameters"] == copy.text["parameters"]
        assert "a cat\nSteps: 6, " in image.text["parameters"]
    assert [path.name for path in tmp_path.iterdir()] == ["cat.png"]  # no temporary left


def test_a_few_step_model_without_steps_or_guidance_runs_its_preset(
    library_daemon, tmp_path: Path
) -> None:
    """What the user leaves out is not sent: the daemon applies the model's own defaults."""
    out = tmp_path / "turbo.png"
    run = sdbridge(
        "generate", "a red circle", "--address", library_daemon.address,
        "--model", "tiny-sd-turbo", "--width", "64", "--height", "64", "-o", str(out),
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "step 4/4" in run.stderr
    with Image.open(out) as image:
        parameters = image.text["parameters"]
    assert "Steps: 4," in parameters and "CFG scale: 0," in parameters
    assert "Sampler: Euler a" in parameters


def test_batch_writes_numbered_files(daemon, tmp_path: Path) -> None:
    out = tmp_path / "many.png"
    run = sdbridge(
        "generate", "dogs", "--address", daemon.address, "--steps", "3", "--batch", "2",
        "--seed", "10", "-o", str(out), "-q",
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "seed 10" in run.stdout and "seed 11" in run.stdout
    for name, seed in [("many-1.png", 10), ("many-2.png", 11)]:  # each file its own seed
        with Image.open(tmp_path / name) as image:
            assert f"Seed: {seed}," in image.text["parameters"]


def test_inpaint_from_files_keeps_the_unmasked_pixels(daemon, tmp_path: Path) -> None:
    init = np.zeros((64, 64, 3), np.uint8)
    init[..., 2] = 180
    mask = np.zeros((64, 64), np.uint8)
    mask[:, 32:] = 255
    Image.fromarray(init).save(tmp_path / "init.png")
    Image.fromarray(mask).save(tmp_path / "mask.png")
    out = tmp_path / "out.png"
    run = sdbridge(
        "generate", "a tree", "--address", daemon.address, "--steps", "4", "--seed", "1",
        "--init-image", str(tmp_path / "init.png"), "--mask", str(tmp_path / "mask.png"),
        "--strength", "1.0", "-o", str(out), "-q",
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    with Image.open(out) as image:
        result = np.asarray(image.convert("RGB"))
    assert np.array_equal(result[:, :32], init[:, :32])


def test_status_and_the_address_from_the_environment(daemon) -> None:
    run = sdbridge("status", env={"SDBRIDGE_ADDRESS": daemon.address})
    assert run.returncode == 0, run.stderr
    assert "device   cpu (float32)" in run.stdout
    assert "model    tiny-sd" in run.stdout
    assert daemon.address in run.stdout


def test_no_daemon_is_a_plain_error_not_a_hang() -> None:
    address = f"tcp://127.0.0.1:{free_port()}"
    # A hang (on the job's 600 s --timeout, or for ever) runs into sdbridge()'s own timeout,
    # which fails the test; no bound on a busy machine's clock needed.
    run = sdbridge("generate", "x", "--address", address, "--wait", "1")
    assert run.returncode == 1
    assert f"no sdbridge daemon at {address}" in run.stderr


def test_a_bad_request_is_reported_by_field(daemon) -> None:
    run = sdbridge("generate", "x", "--address", daemon.address, "--steps", "0")
    assert run.returncode == 1
    assert "num_inference_steps" in run.stderr


def test_serve_refuses_an_address_in_use(daemon, pipeline_dir: Path) -> None:
    run = sdbridge("serve", "--model", str(pipeline_dir), "--listen", daemon.address)
    assert run.returncode == 2
    assert "cannot listen" in run.stderr


def test_every_command_has_a_clean_help(capsys) -> None:
    """argparse formats help with `%`: a bare one in an option's help dumped argparse's
    internals into `serve --help`."""

    def help_text(*command: str) -> str:
        with pytest.raises(SystemExit) as exit:
            main([*command, "--help"])
        assert exit.value.code == 0
        return capsys.readouterr().out

    top = help_text()
    commands = re.search(r"\{([a-z,-]+)\}", top).group(1).split(",")
    assert {"serve", "config", "generate"} <= set(commands)
    for command in commands:
        text = help_text(command)
        assert text.startswith(f"usage: sdbridge {command} ")
        assert not re.search(r"\{'|<argparse|object at 0x", text), text
    assert "less memory in attention, ~10% slower" in " ".join(help_text("serve").split())


def test_results_saves_the_image_of_a_generate_that_was_killed(daemon, tmp_path: Path) -> None:
    """The terminal closed mid-job: the daemon finishes and saves it, `results` gets it back."""
    prompt = f"a killed run {free_port()}"  # unique on the shared daemon
    command = [sys.executable, "-m", "sdbridge", "generate", prompt, "--steps", "60"]
    command += ["--address", daemon.address, "-o", str(tmp_path / "never.png")]
    killed = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    assert killed.stderr is not None
    while "step" not in killed.stderr.read(64):
        pass
    killed.kill()
    killed.wait()

    def listed() -> bool:
        run = sdbridge("results", "--limit", "3", "--address", daemon.address)
        return prompt in run.stdout

    wait_until(listed, timeout=60)
    run = sdbridge(
        "results", "--limit", "1", "--save", str(tmp_path / "back"), "--address", daemon.address
    )
    assert run.returncode == 0, run.stderr
    assert prompt in run.stdout
    (saved,) = (tmp_path / "back").iterdir()
    with Image.open(saved) as image:
        assert image.text["parameters"].startswith(prompt + "\nSteps: 60, ")
    assert not (tmp_path / "never.png").exists()
