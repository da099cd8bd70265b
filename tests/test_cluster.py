"""`sdbridge serve --cluster`: the same daemon, its jobs run by workers on a Ray cluster.

A real Ray head on loopback (`ray start --head`, bounded to 2 CPUs, token auth on) with a daemon
running two CPU workers on the tests' small model, and a daemon that starts its own Ray
(`--cluster local`) for Ray going down. Workers are found by their process titles under the head
(`ray::Worker.run` while a job runs) to be killed.
"""

from __future__ import annotations

import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from helpers import DaemonProcess, Peer, free_port, sdbridge, wait_until

from sdbridge import tiny
from sdbridge.daemon.settings import load_settings
from sdbridge.wire import protocol

JOB = {"prompt": "a red circle on a blue background", "num_inference_steps": 8, "seed": 42}
TINY_SD = "tiny-sd"  # the tests' small model (conftest.pipeline_dir): every worker's first
WORKER_READY_TIMEOUT = 180.0


@pytest.fixture(scope="module")
def ray_environment() -> Iterator[dict[str, str]]:
    """What the head, the daemons and their workers share: a token, a short temporary folder
    (Ray's socket paths must stay short), loopback addresses only, no usage report."""
    environment = {
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(16),
        "RAY_TMPDIR": tempfile.mkdtemp(prefix="sdb-ray-"),
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # a single-node cluster: Ray binds loopback
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    with pytest.MonkeyPatch.context() as patch:
        for name, value in environment.items():
            patch.setenv(name, value)
        yield environment
    shutil.rmtree(environment["RAY_TMPDIR"], ignore_errors=True)  # sessions' logs and sockets


@pytest.fixture(scope="module")
def ray_head(ray_environment: dict[str, str]) -> Iterator[tuple[str, psutil.Process]]:
    """A Ray head as an operator starts one, with 2 CPUs; its address and its process."""
    port = free_port()
    command = [
        str(Path(sys.executable).with_name("ray")), "start", "--head", "--block",
        "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2",
        "--include-dashboard=false", "--disable-usage-stats",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--object-store-memory={100 * 2**20}",
    ]  # fmt: skip
    log = Path(ray_environment["RAY_TMPDIR"]) / "head.log"
    with open(log, "wb") as output:
        head = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)

    def up() -> bool:
        assert head.poll() is None, f"ray start exited:\n{log.read_text(errors='replace')}"
        with socket.socket() as probe:
            return probe.connect_ex(("127.0.0.1", port)) == 0

    wait_until(up, 60)
    yield f"127.0.0.1:{port}", psutil.Process(head.pid)
    head.terminate()  # `--block`: it stops every Ray process it started
    head.wait(60)


@pytest.fixture(scope="module")
def cluster(
    ray_head: tuple[str, psutil.Process], pipeline_dir: Path, tmp_path_factory
) -> Iterator[DaemonProcess]:
    """A daemon whose two workers run on the head, serving the test model and the embedded one."""
    workdir = tmp_path_factory.mktemp("cluster")
    process = DaemonProcess(pipeline_dir, workdir, "--cluster", ray_head[0], "--workers", "2")
    try:
        yield process.start()
    finally:
        process.stop()  # also when it did not start


def worker_running_a_job(head: psutil.Process) -> psutil.Process:
    """The worker process of the head whose title says it runs a job."""
    for child in head.children(recursive=True):
        try:
            if child.cmdline()[:1] == ["ray::Worker.run"]:
                return child
        except psutil.NoSuchProcess:
            continue
    raise AssertionError("no worker is running a job")


def comparable(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Events without what differs between two daemons for the same job: times, file paths."""
    cleaned = []
    for event in events:
        event = {k: v for k, v in event.items() if k not in ("elapsed", "eta")}
        if "images" in event:
            event["images"] = [{**image, "path": None} for image in event["images"]]
        cleaned.append(event)
    return cleaned


def test_two_clients_jobs_run_at_the_same_time_on_different_workers(cluster) -> None:
    alice, bob = Peer(cluster.address), Peer(cluster.address)
    try:
        long = {**JOB, "model": TINY_SD, "num_inference_steps": 150}
        a = alice.send("generate", **long)
        alice.until(a, {"progress"})
        b = bob.send("generate", **{**long, "seed": 7})
        bob.until(b, {"progress"})
        # One worker would have finished Alice's job before starting Bob's.
        assert not [e for e in alice.drain() if e["event"] in protocol.TERMINAL_EVENTS]
        for peer, job in ((alice, a), (bob, b)):
            peer.send("cancel", job=job)
            assert peer.until(job)[-1]["event"] == "cancelled"
    finally:
        alice.close()
        bob.close()


def test_events_and_pixels_are_the_single_process_daemons(
    cluster, pipeline_dir: Path, tmp_path: Path
) -> None:
    """Against a local daemon whose torch has one thread, as a CPU worker's has: with two, the
    last bits of the pixels differ on an AVX-512 CPU (not on an AVX2 one)."""
    daemon = DaemonProcess(pipeline_dir, tmp_path, env={"OMP_NUM_THREADS": "1"}).start()
    job = {**JOB, "model": TINY_SD, "preview_every": 2, "negative_prompt": "blurry"}
    try:
        for output_format in ("raw", "png"):
            events = {}
            for side in (cluster, daemon):
                peer = Peer(side.address)
                try:
                    events[side] = peer.generate(**job, output_format=output_format)
                finally:
                    peer.close()
            assert [e["event"] for e in events[cluster]].count("preview") == 4
            assert comparable(events[cluster]) == comparable(events[daemon])
    finally:
        daemon.stop()
    saved = Path(events[cluster][-1]["images"][0]["path"])
    assert saved.is_relative_to(cluster.output_dir)  # the front daemon's folder
    assert saved.read_bytes() == events[cluster][-1]["images"][0]["data"]


def test_cancel_reaches_the_running_worker_then_the_next_job_runs(cluster) -> None:
    peer = Peer(cluster.address)
    try:
        rid = peer.send("generate", **{**JOB, "model": TINY_SD, "num_inference_steps": 150})
        peer.until(rid, {"progress"})
        cancel = peer.send("cancel", job=rid)
        assert peer.until(cancel, {"cancel"})[-1]["state"] == "running"
        events = peer.until(rid)
        assert (events[-1]["event"], events[-1]["reason"]) == ("cancelled", "client")
        steps = [e["step"] for e in peer.inbox if e["id"] == rid and e["event"] == "progress"]
        assert max(steps) < 150
        assert peer.generate(**JOB, model=TINY_SD)[-1]["event"] == "result"
    finally:
        peer.close()


def test_a_job_goes_to_the_worker_that_holds_its_model(cluster) -> None:
    """Both workers start on the test model; the embedded one is loaded once, by one worker,
    and its later jobs go there while the other worker keeps the test model."""
    peer = Peer(cluster.address)
    try:
        loads = []
        for model in (tiny.NAME, TINY_SD, tiny.NAME, TINY_SD, tiny.NAME):
            events = peer.generate(**JOB, model=model)
            assert events[-1]["event"] == "result"
            loads.append(any(e["event"] == "loading" for e in events))
        assert loads == [True, False, False, False, False]
        listing = peer.answer("models")
        assert {m["name"] for m in listing["models"] if m["loaded"]} == {tiny.NAME, TINY_SD}
    finally:
        peer.close()


def test_a_killed_worker_ends_its_job_with_one_error_and_is_replaced(
    cluster, ray_head: tuple[str, psutil.Process]
) -> None:
    peer = Peer(cluster.address)
    try:
        rid = peer.send("generate", **{**JOB, "model": TINY_SD, "num_inference_steps": 150})
        peer.until(rid, {"progress"})
        worker_running_a_job(ray_head[1]).kill()
        events = peer.until(rid)
        assert events[-1]["event"] == "error" and events[-1]["code"] == "internal"
        assert "worker running this job was lost" in events[-1]["message"]
        assert peer.silent(1.0)  # no second terminal event, nor anything else
        assert peer.generate(**JOB, model=TINY_SD)[-1]["event"] == "result"
        # Two workers again: the replacement and the survivor run two jobs at once.
        wait_until(lambda: cluster.log().count("ready on") == 3, WORKER_READY_TIMEOUT)
    finally:
        peer.close()
    test_two_clients_jobs_run_at_the_same_time_on_different_workers(cluster)


def test_with_ray_gone_jobs_get_an_error_at_once_and_the_daemon_answers(
    ray_environment, pipeline_dir: Path, tmp_path: Path
) -> None:
    own = DaemonProcess(pipeline_dir, tmp_path, "--cluster", "local", "--workers", "1")
    peer = Peer(own.address)
    try:
        own.start()
        assert peer.generate(**JOB)[-1]["event"] == "result"
        ray = psutil.Process(own.process.pid).children(recursive=True)  # all Ray's, workers too
        assert {"gcs_server", "raylet"} <= {process.name() for process in ray}
        for process in ray:
            process.kill()
        for _ in range(2):  # the job on the worker that went with it, then one with none left
            started = time.monotonic()
            error = peer.generate(**JOB)[-1]
            assert error["event"] == "error" and error["code"] == "internal"
            assert "Ray cluster does not answer" in error["message"]
            assert time.monotonic() - started < 15
        assert peer.answer("hello")["event"] == "hello"
        # Ray's own threads polling its dead GCS flat out would show here.
        assert psutil.Process(own.process.pid).cpu_percent(interval=2.0) < 50
        assert own.stop(signal.SIGTERM, timeout=30) == 0
    finally:
        peer.close()
        own.kill()


def test_a_cluster_that_cannot_serve_is_refused_at_start(ray_environment) -> None:
    address = f"127.0.0.1:{free_port()}"
    run = sdbridge("serve", "--cluster", address, "--listen", f"tcp://127.0.0.1:{free_port()}")
    assert run.returncode == 2 and f"nothing answers at {address}" in run.stderr, run.stderr
    from sdbridge.daemon.cluster import ClusterError, start_cluster

    settings = load_settings(None, {"cluster": "ray://127.0.0.1:10001"}, {})
    with pytest.raises(ClusterError, match=r"Ray Client \(ray://\) cannot stream"):
        start_cluster(settings, tiny.NAME)


def test_the_cluster_is_a_setting_like_any_other(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('cluster = "auto"\nworkers = 4\n')
    settings = load_settings(str(config), {"workers": 2}, {})
    assert (settings.cluster, settings.sources["cluster"]) == ("auto", "file")
    assert (settings.workers, settings.sources["workers"]) == (2, "flag")
    assert load_settings(None, {}, {}).cluster is None  # no cluster unless asked for


def test_a_daemon_without_a_cluster_imports_nothing_of_ray() -> None:
    code = (
        "import sys, sdbridge.cli, sdbridge.daemon.daemon, sdbridge.daemon.startup;"
        "assert not [m for m in sys.modules if m.split('.')[0] == 'ray'], 'ray imported'"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
