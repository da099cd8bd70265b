"""Shared fixtures: a small local pipeline and real daemons serving it."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq
from diffusers import StableDiffusionPipeline
from pipelines import build_lora, build_pipeline, build_sdxl_pipeline

from sdbridge import protocol

# Nothing may come from a model hub in tests.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
# Daemons started by tests read no config file and scan no models folder of the user's own.
_USER_DIRS = tempfile.mkdtemp(prefix="sdbridge-test-home-")
os.environ["XDG_CONFIG_HOME"] = os.path.join(_USER_DIRS, "config")
os.environ["XDG_DATA_HOME"] = os.path.join(_USER_DIRS, "data")
READY_TIMEOUT = 120.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ask(address: str, message: dict, timeout: float = 5.0, token: str | None = None) -> dict | None:
    """One request over a fresh pyzmq DEALER; None if nothing answers in time."""
    dealer = zmq.Context.instance().socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    if token is not None:
        dealer.plain_username = protocol.TOKEN_USERNAME
        dealer.plain_password = token.encode()
    try:
        dealer.connect(address)
        dealer.send(protocol.pack(message))
        if dealer.poll(int(timeout * 1000)):
            return protocol.unpack(dealer.recv())
        return None
    finally:
        dealer.close()


class DaemonProcess:
    """`sdbridge serve` in a subprocess, as a user starts it."""

    def __init__(
        self,
        model: Path | str,
        workdir: Path,
        *extra: str,
        token: str | None = None,
        listen_host: str = "127.0.0.1",
    ) -> None:
        """With a ``token`` the daemon reads it from a file and requires it of every peer."""
        self.model = str(model)
        self.port = free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.listen = f"tcp://{listen_host}:{self.port}"
        self.token = token
        if token is not None:
            token_file = workdir / f"token-{self.port}"
            token_file.write_text(token + "\n")
            token_file.chmod(0o600)
            extra = (*extra, "--token-file", str(token_file))
        self.output_dir = workdir / "outputs"
        self.log_path = workdir / f"daemon-{self.port}.log"
        self.extra = extra
        self.process: subprocess.Popen | None = None

    def start(self) -> DaemonProcess:
        command = [sys.executable, "-m", "sdbridge", "serve", "--model", self.model]
        command += ["--listen", self.listen, "--output-dir", str(self.output_dir), *self.extra]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.process.returncode}:\n{self.log()}")
            if ask(self.address, {"v": 1, "op": "hello", "id": "r"}, timeout=1.0, token=self.token):
                return self
        raise RuntimeError(f"daemon not ready in {READY_TIMEOUT} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else None
        self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def restart(self) -> DaemonProcess:
        self.stop()
        return self.start()


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
    the test model as an original-format checkpoint, a few-step model known by its name, a
    pickle checkpoint, and two LoRAs (one in a subfolder)."""
    from checkpoints import write_single_file_checkpoint  # the SD 1.x converter of test_models

    root = tmp_path_factory.mktemp("library")
    models, loras = root / "models", root / "loras"
    build_sdxl_pipeline(models / "xl" / "tiny-xl")
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
        "[limits]\nmax_images = 3\nmax_steps = 100\n"
    )
    # A flag beats the file (test_config checks both limits).
    command = ("--config", str(config), "--max-steps", "120")
    process = DaemonProcess(pipeline_dir, workdir, *command).start()
    yield process
    process.stop()
