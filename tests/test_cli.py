"""The `sdbridge` command as a user types it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from daemons import free_port
from PIL import Image


def sdbridge(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sdbridge", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def test_generate_writes_the_image_and_shows_progress(daemon, tmp_path: Path) -> None:
    out = tmp_path / "cat.png"
    run = sdbridge(
        "generate", "a cat", "--address", daemon.address, "--steps", "6", "--seed", "5",
        "--width", "96", "--height", "64", "-o", str(out),
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "step 6/6" in run.stderr and "ETA" in run.stderr
    assert "seed 5" in run.stdout
    with Image.open(out) as image:
        assert image.size == (96, 64)


def test_batch_writes_numbered_files(daemon, tmp_path: Path) -> None:
    out = tmp_path / "many.png"
    run = sdbridge(
        "generate", "dogs", "--address", daemon.address, "--steps", "3", "--batch", "2",
        "--seed", "10", "-o", str(out), "-q",
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "many-1.png").is_file() and (tmp_path / "many-2.png").is_file()
    assert "seed 10" in run.stdout and "seed 11" in run.stdout


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
    start = time.monotonic()
    run = sdbridge("generate", "x", "--address", address, "--wait", "1")
    assert run.returncode == 1
    assert address in run.stderr
    assert time.monotonic() - start < 30


def test_a_bad_request_is_reported_by_field(daemon) -> None:
    run = sdbridge("generate", "x", "--address", daemon.address, "--steps", "0")
    assert run.returncode == 1
    assert "num_inference_steps" in run.stderr


def test_serve_refuses_an_address_in_use(daemon, pipeline_dir: Path) -> None:
    run = sdbridge("serve", "--model", str(pipeline_dir), "--listen", daemon.address)
    assert run.returncode == 2
    assert "cannot listen" in run.stderr
