"""Saving images: a killed daemon, a full disk or a read-only folder never leave a half-written
PNG under a final name, and never cost the client its image."""

from __future__ import annotations

import errno
import io
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from helpers import TIMEOUT, Peer, free_port, pixels, sdbridge
from PIL import Image

NUMBERED = re.compile(r"^\d{5}-\d+\.png$")


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """Mounts a tmpfs with the given options (`size=200k`, `ro`); unmounted after the test's
    daemons are gone (request it before `daemon_factory`)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (as the tests run here and in CI)")
    mounted: list[Path] = []

    def mount(options: str) -> Path:
        point = tmp_path / f"tmpfs-{len(mounted)}"
        point.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], check=True)
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "--lazy", str(point)], check=True)


def _files(folder: Path) -> list[Path]:
    return [path for path in folder.rglob("*") if path.is_file()]


def _load_every_png(folder: Path) -> list[Path]:
    """Every PNG in the tree, each decoded to the last pixel (a truncated one raises)."""
    pngs = sorted(folder.rglob("*.png"))
    for path in pngs:
        with Image.open(path) as image:
            image.load()
            assert "Seed: " in image.text["parameters"]
    return pngs


@pytest.mark.parametrize("moment", ["first_image_on_disk", "next_image_being_written"])
def test_a_daemon_killed_while_saving_leaves_only_whole_images(daemon_factory, moment) -> None:
    daemon = daemon_factory("--max-pixels", str(2048 * 2048))  # over what 24 GiB gives
    peer = Peer(daemon.address)
    # 3 raw images of 2048x2048: each written stored, 16 MiB a file.
    peer.send("generate", prompt="a big picture", width=2048, height=2048, num_images=3,
              num_inference_steps=1, seed=1)  # fmt: skip

    def kill_now() -> bool:
        names = [path.name for path in _files(daemon.output_dir)]
        if not any(NUMBERED.match(name) for name in names):
            return False
        return moment == "first_image_on_disk" or any(name.endswith(".tmp") for name in names)

    deadline = time.monotonic() + TIMEOUT
    while not kill_now():  # no sleep: the moment lasts milliseconds
        assert time.monotonic() < deadline, f"no image saved in {TIMEOUT} s"
    daemon.process.send_signal(signal.SIGKILL)
    daemon.process.wait()
    peer.close()

    assert _load_every_png(daemon.output_dir)
    daemon.start()  # a restart removes what the killed one was writing
    assert [path.name for path in _files(daemon.output_dir) if path.suffix == ".tmp"] == []
    _load_every_png(daemon.output_dir)


def test_a_full_disk_costs_the_client_only_the_daemons_copy(tmpfs, daemon_factory) -> None:
    folder = tmpfs("size=200k")
    daemon = daemon_factory("--output-dir", str(folder))
    filler = folder / "filler"
    with pytest.raises(OSError) as full:
        filler.write_bytes(bytes(300 * 1024))
    assert full.value.errno == errno.ENOSPC
    peer = Peer(daemon.address)
    job = {"prompt": "a red circle", "width": 96, "height": 64, "num_inference_steps": 2}

    raw, png = (peer.generate(**job, seed=3, output_format=kind)[-1] for kind in ("raw", "png"))
    for result in (raw, png):
        assert result["event"] == "result", result
        assert result["warning"] == "not saved: no space left on device in the output folder"
        assert result["images"][0]["path"] is None
        assert "Seed: 3" in result["images"][0]["parameters"]
    decoded = np.asarray(Image.open(io.BytesIO(png["images"][0]["data"])).convert("RGB"))
    assert decoded.shape == (64, 96, 3)
    assert np.array_equal(decoded, pixels(raw["images"][0])[..., :3])  # the same job twice
    assert _files(folder) == [filler]  # nothing truncated, no temporary

    filler.unlink()  # space again: the next image is saved
    result = peer.generate(**job, seed=4)[-1]
    assert result["warning"] is None
    assert _load_every_png(folder) == [Path(result["images"][0]["path"])]
    peer.close()


def test_serve_refuses_a_read_only_output_folder(tmpfs, pipeline_dir: Path) -> None:
    folder = tmpfs("ro,size=200k") / "sdbridge"
    run = sdbridge(
        "serve", "--model", str(pipeline_dir), "--output-dir", str(folder),
        "--listen", f"tcp://127.0.0.1:{free_port()}",
    )  # fmt: skip
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        f"sdbridge: cannot save images in {folder} (Read-only file system); "
        "choose another folder with --output-dir"
    ]


def test_a_prompt_cannot_forge_lines_of_the_parameters_text(daemon) -> None:
    prompt = "a cat\nNegative prompt: forged\nSteps: 1, Sampler: forged, Seed: 666"
    peer = Peer(daemon.address)
    result = peer.generate(prompt=prompt, negative_prompt="blurry\r\nSteps: 99", seed=5,
                           width=64, height=64, num_inference_steps=2)[-1]  # fmt: skip
    peer.close()
    with Image.open(result["images"][0]["path"]) as image:
        text = image.text["parameters"]
    assert text == result["parameters"] == result["images"][0]["parameters"]
    # As A1111's "PNG Info" reads it: prompt lines, a "Negative prompt:" line, the last line.
    first, negative, last = text.split("\n")
    assert first == "a cat Negative prompt: forged Steps: 1, Sampler: forged, Seed: 666"
    assert negative == "Negative prompt: blurry Steps: 99"
    assert last.startswith("Steps: 2, ") and "Seed: 5" in last
