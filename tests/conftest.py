"""Shared fixtures: small local pipelines, real daemons serving them, peers talking to them.

The daemon process and the peer themselves are in tests/helpers.py.
"""

from __future__ import annotations

import os
import tempfile

# Set before anything imports huggingface_hub, which reads it once: nothing may come from a hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import shutil  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from diffusers import StableDiffusionPipeline  # noqa: E402
from helpers import DaemonProcess, Peer  # noqa: E402
from pipelines import build_lora, build_pipeline, build_sdxl_pipeline  # noqa: E402

# Daemons started by tests read no config file and scan no models folder of the user's own.
_USER_DIRS = tempfile.mkdtemp(prefix="sdbridge-test-home-")
os.environ["XDG_CONFIG_HOME"] = os.path.join(_USER_DIRS, "config")
os.environ["XDG_DATA_HOME"] = os.path.join(_USER_DIRS, "data")


@pytest.fixture(scope="session")
def pipeline_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("pipeline") / "tiny-sd"
    build_pipeline(folder)
    return folder


@pytest.fixture(scope="session")
def daemon(pipeline_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    """One daemon shared by the tests that only need a daemon to talk to."""
    process = DaemonProcess(pipeline_dir, tmp_path_factory.mktemp("daemon")).start()
    yield process
    process.stop()


@pytest.fixture
def daemon_factory(pipeline_dir: Path, tmp_path: Path) -> Iterator:
    """Daemons of a test's own, for tests that stop, kill or restart them."""
    started: list[DaemonProcess] = []

    def start(*extra: str, model: Path | str | None = None, **options: str) -> DaemonProcess:
        process = DaemonProcess(model or pipeline_dir, tmp_path, *extra, **options).start()
        started.append(process)
        return process

    yield start
    for process in started:
        process.kill()


@pytest.fixture(scope="session")
def library(pipeline_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A user's models and loras folders as model sites fill them: an SDXL diffusers folder,
    it and the test model as original-format checkpoints, a few-step model known by its name,
    a pickle checkpoint, and two LoRAs (one in a subfolder)."""
    from checkpoints import write_sdxl_single_file_checkpoint, write_single_file_checkpoint

    root = tmp_path_factory.mktemp("library")
    models, loras = root / "models", root / "loras"
    sdxl = build_sdxl_pipeline(models / "xl" / "tiny-xl")
    write_sdxl_single_file_checkpoint(sdxl, models / "xl" / "tiny-xl-file.safetensors")
    pipe = StableDiffusionPipeline.from_pretrained(pipeline_dir)
    write_single_file_checkpoint(pipe, models / "tiny-sd-file.safetensors")
    shutil.copytree(pipeline_dir, models / "tiny-sd-turbo")
    (models / "old.ckpt").write_bytes(b"PK\x03\x04 a pickled checkpoint")
    build_lora(pipe, loras / "ink.safetensors", seed=1)
    build_lora(pipe, loras / "styles" / "paper.safetensors", seed=2)
    return root


@pytest.fixture(scope="session")
def library_daemon(
    library: Path, pipeline_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[DaemonProcess]:
    """A daemon serving the test model plus the library, set up by a config file."""
    workdir = tmp_path_factory.mktemp("library-daemon")
    config = workdir / "config.toml"
    config.write_text(
        f'models_dir = "{library / "models"}"\n'
        f'loras_dir = "{library / "loras"}"\n'
        "max_loaded_models = 2\n"
        '[models."tiny-sd-file"]\n'
        f'config = "{pipeline_dir}"\n'
        '[models."xl/tiny-xl-file"]\n'
        f'config = "{library / "models" / "xl" / "tiny-xl"}"\n'
        "[limits]\nmax_images = 3\nmax_steps = 100\n"
    )
    # A flag beats the file (test_config checks both limits).
    command = ("--config", str(config), "--max-steps", "120")
    process = DaemonProcess(pipeline_dir, workdir, *command).start()
    yield process
    process.stop()


@pytest.fixture
def peer(daemon: DaemonProcess) -> Iterator[Peer]:
    """A DEALER connection to the shared daemon."""
    connection = Peer(daemon.address)
    yield connection
    connection.close()


@pytest.fixture
def library_peer(library_daemon: DaemonProcess) -> Iterator[Peer]:
    """A DEALER connection to the library daemon."""
    connection = Peer(library_daemon.address)
    yield connection
    connection.close()
