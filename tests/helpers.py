"""What the tests share: `sdbridge serve` subprocesses, DEALER peers, raw images, the CLI.

A plain module, not conftest.py: test modules import from it, and a `conftest` import would
resolve to whichever conftest.py (tests/, tests/krita/) pytest loaded first. One module, so that
no test copies a helper another already has.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from sdbridge.wire import protocol

REPOSITORY = Path(__file__).parents[1]


def trained_from(folder: Path) -> list[Path]:
    """The folders a trained folder's weights were trained on from (its sdbridge.json's
    training "init", relative to the repository, then that one's), newest first; the first
    version's records none."""
    chain = []
    while init := json.loads((folder / "sdbridge.json").read_text())["training"].get("init"):
        folder = REPOSITORY / init
        chain.append(folder)
    return chain


READY_TIMEOUT = 120.0
TIMEOUT = 60.0  # for one job of the tiny test model, on a loaded 2-core machine


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (at the time of asking)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Polls `condition` until it holds; fails the test if it does not within `timeout`."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"condition not met in {timeout} s"
        time.sleep(0.01)


def sdbridge(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess:
    """The `sdbridge` command as a user types it, with `env` on top of this process's."""
    return subprocess.run(
        [sys.executable, "-m", "sdbridge", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


class Peer:
    """A libzmq DEALER connection to a daemon that collects events by request id."""

    def __init__(
        self, address: str, token: str | None = None, username: bytes = protocol.TOKEN_USERNAME
    ) -> None:
        """With a ``token`` the peer logs in with ZMTP PLAIN, as a remote client does."""
        self.socket = zmq.Context.instance().socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        if token is not None:
            self.socket.plain_username = username
            self.socket.plain_password = token.encode()
        self.socket.connect(address)
        self.inbox: list[dict[str, Any]] = []
        self.counter = 0

    def send(self, op: str, **fields: Any) -> str:
        self.counter += 1
        rid = fields.pop("id", f"r{self.counter}")
        self.socket.send(protocol.pack({"v": 1, "op": op, "id": rid, **fields}))
        return rid

    def send_raw(self, *frames: bytes) -> None:
        self.socket.send_multipart(list(frames))

    def receive(self, timeout: float = TIMEOUT) -> dict[str, Any]:
        if not self.socket.poll(int(timeout * 1000)):
            raise TimeoutError("no event from the daemon")
        message = protocol.unpack(self.socket.recv())
        self.inbox.append(message)
        return message

    def drain(self, wait_ms: int = 0) -> list[dict[str, Any]]:
        """Every event already here, after waiting up to `wait_ms` for the first."""
        events = []
        while self.socket.poll(wait_ms):
            events.append(self.receive())
            wait_ms = 0
        return events

    def silent(self, seconds: float) -> bool:
        """Whether nothing at all arrives for `seconds`."""
        return not self.socket.poll(int(seconds * 1000))

    def until(self, rid: str | None, terminal: set[str] = protocol.TERMINAL_EVENTS) -> list[dict]:
        """Events for `rid` up to and including its terminal event."""
        events = []
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            message = self.receive(deadline - time.monotonic())
            if message["id"] == rid:
                events.append(message)
                if message["event"] in terminal:
                    return events
        raise TimeoutError(f"no terminal event for {rid}")

    def answer(self, op: str, **fields: Any) -> dict[str, Any]:
        rid = self.send(op, **fields)
        return self.until(rid, {op, "error"})[-1]

    def generate(self, **fields: Any) -> list[dict[str, Any]]:
        return self.until(self.send("generate", **fields))

    def close(self) -> None:
        self.socket.close()


def ask(address: str, message: dict, timeout: float = 5.0, token: str | None = None) -> dict | None:
    """One request over a fresh DEALER; its first answer, or None if nothing answers in time."""
    peer = Peer(address, token=token)
    try:
        peer.socket.send(protocol.pack(message))
        return peer.receive(timeout)
    except TimeoutError:
        return None
    finally:
        peer.close()


def raw_image(array: np.ndarray) -> dict[str, Any]:
    """A protocol `raw` image (RGBA bytes) of a grey, RGB or RGBA uint8 array."""
    height, width = array.shape[:2]
    if array.ndim == 2 or array.shape[2] == 1:
        array = np.repeat(array.reshape(height, width, 1), 3, axis=2)
    if array.shape[2] == 3:
        array = np.concatenate([array, np.full((height, width, 1), 255, np.uint8)], axis=2)
    return {"width": width, "height": height, "format": "raw", "data": array.tobytes()}


def solid_image(width: int, height: int, rgba: tuple[int, int, int, int]) -> dict[str, Any]:
    """A protocol `raw` image of one colour."""
    return raw_image(np.full((height, width, 4), rgba, np.uint8))


def pixels(image: dict[str, Any]) -> np.ndarray:
    """The RGBA array of a protocol `raw` image."""
    assert image["format"] == "raw"
    return np.frombuffer(image["data"], np.uint8).reshape(image["height"], image["width"], 4)


def result_image(events: list[dict[str, Any]], index: int = 0) -> np.ndarray:
    """The `index`th image of a job that ended in a result, as int32 RGBA for differences."""
    assert events[-1]["event"] == "result", events[-1]
    return pixels(events[-1]["images"][index]).astype(np.int32)


class DaemonProcess:
    """`sdbridge serve` in a subprocess, as a user starts it."""

    def __init__(
        self,
        model: Path | str,
        workdir: Path,
        *extra: str,
        token: str | None = None,
        listen_host: str = "127.0.0.1",
        env: dict[str, str] | None = None,
    ) -> None:
        """With a ``token`` the daemon reads it from a file and requires it of every peer;
        ``env`` adds to the environment it starts in."""
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
        self.env = {**os.environ, **(env or {})}
        self.process: subprocess.Popen | None = None

    def start(self) -> DaemonProcess:
        command = [sys.executable, "-m", "sdbridge", "serve", "--model", self.model]
        command += ["--listen", self.listen, "--output-dir", str(self.output_dir), *self.extra]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=self.env
            )
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


class SilentDaemon:
    """A ROUTER that completes the ZMTP handshake and reads every request but never answers:
    a hung daemon, for the bounds that keep an editor from waiting on it forever."""

    def __init__(self) -> None:
        self._context = zmq.Context()
        self._router = self._context.socket(zmq.ROUTER)
        port = self._router.bind_to_random_port("tcp://127.0.0.1")
        self.address = f"tcp://127.0.0.1:{port}"
        self.requests: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._reader = threading.Thread(target=self._swallow, daemon=True)
        self._reader.start()

    def _swallow(self) -> None:
        while not self._stop.is_set():
            if self._router.poll(50):
                *route, body = self._router.recv_multipart()
                request = protocol.unpack(body)
                self.requests.append(request)
                answer = self._answer(request)
                if answer is not None:
                    self._router.send_multipart([*route, protocol.pack(answer)])

    def _answer(self, request: dict[str, Any]) -> dict[str, Any] | None:
        return None

    def __enter__(self) -> SilentDaemon:
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._reader.join()
        self._router.close(0)
        self._context.term()


class OldDaemon(SilentDaemon):
    """A daemon from before the `results` op: it answers `hello` (without the capability)
    and refuses every other op as unknown."""

    def _answer(self, request: dict[str, Any]) -> dict[str, Any]:
        if request["op"] == "hello":
            return protocol.event("hello", request["id"], capabilities=["models"])
        error = protocol.ProtocolError(
            protocol.ErrorCode.UNKNOWN_OP, f"unknown op {request['op']!r}", "op"
        )
        return protocol.error_event(request["id"], error)


class TcpProxy:
    """A loopback TCP relay to a daemon whose connections can be cut the way a network failure
    cuts them: both ends see their connection close while the daemon goes on; a new connection
    gets through again."""

    def __init__(self, target: str) -> None:
        host, port = target.removeprefix("tcp://").rsplit(":", 1)
        self._target = (host, int(port))
        self._server = socket.create_server(("127.0.0.1", 0))
        self.address = f"tcp://127.0.0.1:{self._server.getsockname()[1]}"
        self._lock = threading.Lock()
        self._open: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:  # closed
                return
            try:
                upstream = socket.create_connection(self._target)
            except OSError:  # the daemon is down: the client sees its connection close
                client.close()
                continue
            with self._lock:
                self._open += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(1 << 16):
                sink.sendall(data)
        except OSError:
            pass
        for end in (source, sink):
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        """Closes every connection relayed so far."""
        with self._lock:
            ends, self._open = self._open, []
        for end in ends:
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)
            end.close()

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(self, *_exc: object) -> None:
        self._server.close()
        self.cut()


def scribble_overlap(image: np.ndarray, region: np.ndarray, size: tuple[int, int]) -> float:
    """How well the embedded model's objects in `image` (H x W x 3 or 4, uint8) cover `region`
    (H x W bool, where a control layer was drawn): IoU at the generation `size` (w, h), as
    `tools.tiny.evaluate` measures it."""
    from PIL import Image

    from tools.tiny.analyse import objects_mask
    from tools.tiny.evaluate import iou

    small = Image.fromarray(image[..., :3]).resize(size, Image.BILINEAR)
    marked = Image.fromarray(region.astype(np.uint8) * 255).resize(size, Image.NEAREST)
    return iou(objects_mask(np.asarray(small)), np.asarray(marked) > 0)


def ellipse(width: int, height: int, box: tuple[int, int, int, int]) -> np.ndarray:
    """A filled ellipse inside `box` (left, top, right, bottom) on a width x height canvas: a
    blob as an artist scribbles it."""
    ys, xs = np.mgrid[0:height, 0:width] + 0.5
    left, top, right, bottom = box
    cx, cy, rx, ry = (left + right) / 2, (top + bottom) / 2, (right - left) / 2, (bottom - top) / 2
    return ((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 <= 1
