"""Faults: the daemon killed and restarted, the device out of memory, a client that stops reading,
Ctrl+C. Each is made to happen for real (a SIGKILL, an OutOfMemoryError raised inside the UNet, a
TCP connection nobody reads) and the test watches what users would see.

A model that fails to load leaving the previous one serving is tested with the models folder
(tests/test_models_folder.py).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import zmq
from diffusers import UNet2DConditionModel
from helpers import Peer, free_port, wait_until
from PIL import Image

from sdbridge.wire import protocol
from sdbridge.wire.client import Client
from sdbridge.wire.zmtp import ZmtpConnection

JOB = {"prompt": "a red circle", "num_inference_steps": 3, "width": 32, "height": 32}
TIMEOUT = 120.0
RSS_MARGIN_BYTES = 32 * 2**20


def test_daemon_killed_mid_job_then_restarted(daemon_factory, tmp_path: Path) -> None:
    daemon = daemon_factory()
    states: list[tuple[bool, str]] = []
    client = Client(daemon.address, timeout=30, on_state=lambda up, text: states.append((up, text)))
    with client:
        assert client.wait_connected(10)
        before = client.generate(**JOB, seed=101).result(timeout=TIMEOUT)
        running = client.generate(**{**JOB, "num_inference_steps": 150, "seed": 102})
        for event in running.events(timeout=TIMEOUT):
            if event["event"] == "progress":
                break
        cli = subprocess.Popen(
            [sys.executable, "-m", "sdbridge", "generate", "a cat", "--address", daemon.address]
            + ["--steps", "150", "-o", str(tmp_path / "cat.png")],
            stderr=subprocess.PIPE,
            text=True,
        )
        _wait_for_queue(client, 2)  # the CLI's job is queued behind ours
        daemon.kill()

        lost = running.wait(timeout=10)
        assert (lost["event"], lost["code"]) == ("error", "connection_lost")
        assert "went away (stopped or restarted)" in lost["message"]
        assert "the job was lost" in lost["message"]
        _, cli_errors = cli.communicate(timeout=30)
        assert cli.returncode == 1
        assert "went away (stopped or restarted); the job was lost" in cli_errors

        daemon.start()  # the same port, as a user restarting it
        assert client.wait_connected(30)
        after = client.generate(**JOB, seed=103).result(timeout=TIMEOUT)
    assert [up for up, _ in states] == [True, False, True, False]  # the last: closed
    assert "went away" in states[1][1]
    for event, seed in ((before, 101), (after, 103)):
        path = Path(event["images"][0]["path"])
        with Image.open(path) as png:
            assert f"Seed: {seed}" in png.text["parameters"]
    assert not list(daemon.output_dir.glob("*/*-102.png"))  # killed before it finished


def _wait_for_queue(client: Client, length: int) -> None:
    wait_until(lambda: len(client.status()["queue"]) >= length, TIMEOUT)


@pytest.fixture
def in_process(pipeline_dir: Path, tmp_path: Path) -> Iterator[Any]:
    """A daemon in this process, so that the test can reach into its pipeline."""
    from sdbridge.daemon.cache import ModelCache
    from sdbridge.daemon.daemon import Daemon
    from sdbridge.daemon.engine import Engine
    from sdbridge.daemon.outputs import OutputFolder

    engine = Engine(ModelCache(str(pipeline_dir), device="cpu"))
    daemon = Daemon(engine, OutputFolder(tmp_path / "outputs"), f"tcp://127.0.0.1:{free_port()}")
    thread = threading.Thread(target=daemon.serve_forever, daemon=True)
    thread.start()
    yield daemon
    daemon.stop()
    thread.join(timeout=60)


def test_out_of_memory_in_the_pipeline_is_an_error_event_and_the_next_job_runs(
    in_process, monkeypatch: pytest.MonkeyPatch
) -> None:
    forward = UNet2DConditionModel.forward
    failures = []

    def forward_once_out_of_memory(unet: UNet2DConditionModel, *args: Any, **kwargs: Any) -> Any:
        if not failures:
            failures.append(time.monotonic())
            raise torch_oom()
        return forward(unet, *args, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "forward", forward_once_out_of_memory)
    peer = Peer(in_process.address)
    try:
        failing = peer.send("generate", **JOB, seed=7)
        queued = peer.send("generate", **JOB, seed=7)
        events = peer.until(failing)
        assert [e["event"] for e in events] == ["accepted", "started", "error"]
        assert events[-1]["code"] == "out_of_memory"
        assert "ran out of memory" in events[-1]["message"]
        assert peer.until(queued)[-1]["event"] == "result"
        assert peer.generate(**JOB, seed=8)[-1]["event"] == "result"
    finally:
        peer.close()
    assert len(failures) == 1


def torch_oom() -> BaseException:
    import torch

    return torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (injected)")


def test_a_client_that_stops_reading_stalls_no_one(
    daemon_factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # glibc otherwise raises its mmap threshold after the first big free and keeps later big
    # blocks in the heap: RSS would then measure the allocator, not what libzmq holds.
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", str(128 * 1024))
    daemon = daemon_factory()
    memory = psutil.Process(daemon.process.pid)
    with Client(daemon.address, timeout=30) as good:
        assert good.wait_connected(10)
        good.generate(**JOB).result(timeout=TIMEOUT)  # warm
        idle = memory.memory_info().rss
        # It asks for far more than any socket buffer holds (2 x 8 x 4 MiB of raw pixels plus a
        # preview every step) and never reads a byte.
        stalled = ZmtpConnection.connect(daemon.address, timeout=10)
        big = {**JOB, "width": 1024, "height": 1024, "num_images": 8, "preview_every": 1}
        for n in range(2):
            stalled.send([protocol.pack({"v": 1, "op": "generate", "id": f"s{n}", **big})])
        _wait_for_queue(good, 1)
        job = good.generate(**JOB)
        slowest_status = 0.0
        stalled_running = 0  # statuses answered while the stalled client's job ran
        while not job.done:  # the socket thread answers throughout (else status() times out)
            asked = time.monotonic()
            queue = good.status()["queue"]
            slowest_status = max(slowest_status, time.monotonic() - asked)
            stalled_running += any(j["state"] == "running" and not j["mine"] for j in queue)
            time.sleep(0.05)
        assert job.result(timeout=0)["event"] == "result"
        assert stalled_running > 0
        # The stalled client's jobs run to the end too (taking turns with ours: the second after).
        wait_until(lambda: good.status()["queue"] == [], TIMEOUT)
        assert len(list(daemon.output_dir.glob("*/*.png"))) == 1 + 2 * 8 + 1
        # libzmq holds what the stalled client has not read (up to SNDHWM messages per peer,
        # whatever their size) and frees it when the client goes.
        held = memory.memory_info().rss
        assert held > idle + 2 * 8 * 4 * 2**20 * 0.9
        stalled.close()
        wait_until(lambda: memory.memory_info().rss <= idle + RSS_MARGIN_BYTES, 30)
        freed = memory.memory_info().rss
        assert good.generate(**JOB).result(timeout=TIMEOUT)["event"] == "result"
    print(
        f"\nstalled reader: slowest status {slowest_status * 1000:.0f} ms; daemon RSS idle "
        f"{idle / 2**20:.0f} MiB, holding the unread events {held / 2**20:.0f} MiB, after the "
        f"reader left {freed / 2**20:.0f} MiB"
    )


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_graceful_shutdown_answers_every_job_and_exits_0(daemon_factory, sig: int) -> None:
    daemon = daemon_factory()
    peer = Peer(daemon.address)
    try:
        running = peer.send("generate", **{**JOB, "num_inference_steps": 150})
        queued = [peer.send("generate", **JOB) for _ in range(3)]
        peer.until(running, {"progress"})
        assert daemon.stop(sig) == 0
        terminal: dict[str, str] = {}
        while len(terminal) < 4:
            event = peer.receive(10)
            if event["event"] in protocol.TERMINAL_EVENTS:
                assert event["id"] not in terminal
                terminal[event["id"]] = event["event"]
        assert terminal == {rid: "cancelled" for rid in [running, *queued]}
        assert not peer.socket.poll(500, zmq.POLLIN)
    finally:
        peer.close()
    assert "stopped" in daemon.log()
