"""Real daemons for tests: `sdbridge serve` subprocesses and one-shot pyzmq requests.

A plain module, not conftest.py: test modules import from it, and a `conftest` import would
resolve to whichever conftest.py (tests/, tests/krita/) pytest loaded first.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import zmq

from sdbridge import protocol

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
