"""Load: many real pure-Python clients at once, with cancels and clients that vanish mid-job.

Every accepted job must end with exactly one terminal event on the wire (or its client is gone),
the queue must drain, the daemon's memory must come back to its idle level, and every image a
job finished must be on disk with its metadata, whoever asked for it. The figures are printed for
docs/reliability.md.
"""

from __future__ import annotations

import contextlib
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psutil
import pytest
from helpers import DaemonProcess
from PIL import Image

from sdbridge.wire import protocol
from sdbridge.wire.client import Client, Job
from sdbridge.wire.zmtp import Frame

CLIENTS = 20
JOBS_PER_CLIENT = 10
TORN_DOWN = 3  # in-process clients that close their connection with jobs still live
KILLED = 3  # client processes killed with SIGKILL with jobs still live
CANCELS_PER_CLIENT = 2
STEPS = 2
WARM_JOBS = 3
TERMINAL = protocol.TERMINAL_EVENTS
SEED_BASE = 500_000
# Allocator caches and torch's thread pools may keep a little; a leak of one result per job
# (200+ jobs) would be far above this.
RSS_MARGIN_BYTES = 48 * 1024 * 1024
TIMEOUT = 240.0

KILLED_CLIENT = """
import sys, time
from sdbridge.wire.client import Client
client = Client(sys.argv[1], timeout=30)
client.wait_connected(30)
jobs = [client.generate(prompt=f"killed {seed}", seed=seed, num_inference_steps={steps},
                        width=8, height=8) for seed in range(int(sys.argv[2]), int(sys.argv[3]))]
for event in jobs[0].events(timeout=120):
    if event["event"] == "progress":
        print("running", flush=True)
        break
time.sleep(600)
"""


class WireClient(Client):
    """The real client, plus every event exactly as it came off the wire (before the client's own
    routing, which would hide a second terminal event)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.wire: list[dict[str, Any]] = []
        super().__init__(*args, **kwargs)

    def _route(self, frames: list[Frame]) -> None:
        with contextlib.suppress(protocol.ProtocolError):
            self.wire.append(protocol.unpack(frames[0]))
        super()._route(frames)


def job_fields(seed: int, rng: random.Random) -> dict[str, Any]:
    return {
        "prompt": f"load {seed}",
        "seed": seed,
        "num_inference_steps": STEPS,
        "width": rng.choice([8, 16, 24]),
        "height": rng.choice([8, 16, 24]),
        "preview_every": rng.choice([0, 1]),
        "output_format": rng.choice(["raw", "png"]),
    }


def run_client(
    index: int, client: WireClient, tear_down: bool, jobs: dict[int, Job], cancelled: set[int]
) -> None:
    rng = random.Random(index)
    seeds = [SEED_BASE + index * 100 + j for j in range(JOBS_PER_CLIENT)]
    for seed in seeds:
        jobs[seed] = client.generate(**job_fields(seed, rng))
    for seed in rng.sample(seeds, CANCELS_PER_CLIENT):
        time.sleep(rng.uniform(0, 3))
        jobs[seed].cancel()
        cancelled.add(seed)
    if tear_down:
        # Gone while its jobs are live: the first running, the rest queued or cancelling.
        first = jobs[seeds[0]]
        for event in first.events(timeout=TIMEOUT):
            if event["event"] in ("progress", *protocol.TERMINAL_EVENTS):
                break
        client.close()
        return
    for seed in seeds:
        jobs[seed].wait(timeout=TIMEOUT)


def rss(process: psutil.Process) -> int:
    return process.memory_info().rss


def wait_drained(address: str) -> dict[str, Any]:
    with Client(address, timeout=30) as observer:
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            status = observer.status()
            if not status["queue"] and status["running"] is None:
                return status
            time.sleep(0.2)
    raise AssertionError(f"the queue did not drain: {status}")


def saved_seeds(output_dir: Path) -> Counter[int]:
    seeds: Counter[int] = Counter()
    for path in output_dir.glob("*/*.png"):
        with Image.open(path) as png:
            parameters = png.text["parameters"]
        seed = int(re.search(r"Seed: (\d+)", parameters).group(1))
        assert path.stem.endswith(f"-{seed}"), path
        assert parameters.startswith(f"load {seed}\n") or parameters.startswith(f"killed {seed}\n")
        seeds[seed] += 1
    return seeds


@pytest.mark.slow
def test_many_clients_with_cancels_and_vanishing_clients(
    pipeline_dir: Path, tmp_path: Path
) -> None:
    total_jobs = (CLIENTS + KILLED) * JOBS_PER_CLIENT
    # Every client connects from 127.0.0.1: one address, whose live jobs count together.
    limits = ("--max-queue", str(total_jobs), "--max-queue-per-client", str(total_jobs))
    daemon = DaemonProcess(pipeline_dir, tmp_path, *limits).start()
    try:
        process = psutil.Process(daemon.process.pid)
        with WireClient(daemon.address, timeout=30) as warm:  # the first jobs allocate for good
            for seed in range(WARM_JOBS):
                warm.generate(**job_fields(seed, random.Random(seed))).result(timeout=TIMEOUT)
        wait_drained(daemon.address)
        idle = rss(process)
        started = time.monotonic()

        killed = []
        for k in range(KILLED):
            first = SEED_BASE + (CLIENTS + k) * 100
            script = KILLED_CLIENT.replace("{steps}", str(STEPS))
            killed.append(
                subprocess.Popen(
                    [sys.executable, "-c", script, daemon.address, str(first)]
                    + [str(first + JOBS_PER_CLIENT)],
                    stdout=subprocess.PIPE,
                    text=True,
                )
            )
        clients = [WireClient(daemon.address, timeout=30) for _ in range(CLIENTS)]
        jobs: dict[int, Job] = {}
        cancelled: set[int] = set()
        threads = [
            threading.Thread(
                target=run_client, args=(i, client, i < TORN_DOWN, jobs, cancelled), daemon=True
            )
            for i, client in enumerate(clients)
        ]
        for thread in threads:
            thread.start()
        peak = idle
        for child in killed:  # each dies as soon as one of its jobs runs
            assert child.stdout.readline() == "running\n"
            child.send_signal(signal.SIGKILL)
            child.wait()
            peak = max(peak, rss(process))
        for thread in threads:
            while thread.is_alive():
                thread.join(0.5)
                peak = max(peak, rss(process))
        status = wait_drained(daemon.address)
        elapsed = time.monotonic() - started
        after = rss(process)

        # Exactly one terminal event per job on the wire, for every client still there.
        outcomes: Counter[str] = Counter()
        must_be_saved, must_not_be_saved = set(), set()
        results: list[dict[str, Any]] = []
        for index, client in enumerate(clients):
            seeds = [SEED_BASE + index * 100 + j for j in range(JOBS_PER_CLIENT)]
            if index < TORN_DOWN:
                # Gone while a job of it ran: its jobs queued at that moment are dropped. One
                # may have started between the close and the daemon seeing it (its `started`
                # never arrived): it runs and is saved, like a running job.
                started = {e["id"] for e in client.wire if e["event"] == "started"}
                never_ran = {seed for seed in seeds if jobs[seed].id not in started}
                saved_anyway = never_ran & set(saved_seeds(daemon.output_dir))
                assert len(never_ran) >= 5 and len(saved_anyway) <= 1, saved_anyway
                continue
            by_id: dict[str, list[dict[str, Any]]] = {}
            for event in client.wire:
                by_id.setdefault(event["id"], []).append(event)
            for seed in seeds:
                events = [e["event"] for e in by_id[jobs[seed].id]]
                terminal = [e for e in by_id[jobs[seed].id] if e["event"] in TERMINAL]
                assert events[0] == "accepted" and len(terminal) == 1, (seed, events)
                kind = terminal[0]["event"]
                assert kind == "result" or (kind == "cancelled" and seed in cancelled), events
                outcomes[kind] += 1
                (must_be_saved if kind == "result" else must_not_be_saved).add(seed)
                if kind == "result":
                    results.append(terminal[0])
        assert outcomes["cancelled"] > 0 and outcomes["result"] > 0

        # 0 results lost: every result is on disk with its metadata. A client that closed its
        # connection or was killed leaves at most its running job's image (queued ones dropped).
        on_disk = saved_seeds(daemon.output_dir)
        assert max(on_disk.values()) == 1  # no image saved twice
        for event in results:
            for image in event["images"]:
                assert Path(image["path"]).is_file() and on_disk[image["seed"]] == 1
        assert must_be_saved <= set(on_disk)
        assert not must_not_be_saved & set(on_disk)  # a cancelled job saves nothing
        killed_range = range(SEED_BASE + CLIENTS * 100, SEED_BASE + (CLIENTS + KILLED) * 100)
        killed_seeds = set(on_disk) - set(jobs) - set(range(WARM_JOBS))
        assert killed_seeds and all(seed in killed_range for seed in killed_seeds)
        assert len(killed_seeds) <= KILLED

        assert status["queue"] == [] and status["running"] is None
        assert after <= idle + RSS_MARGIN_BYTES, (idle, peak, after)
        print(
            f"\nload: {CLIENTS} clients x {JOBS_PER_CLIENT} jobs + {KILLED} killed client "
            f"processes x {JOBS_PER_CLIENT} jobs, {TORN_DOWN} clients closed mid-job; "
            f"{sum(outcomes.values())} jobs watched to the end ({dict(outcomes)}), "
            f"{len(on_disk)} images on disk ({len(killed_seeds)} of killed clients) in "
            f"{elapsed:.1f} s; daemon RSS idle {idle / 2**20:.0f} MiB, peak {peak / 2**20:.0f} "
            f"MiB, after {after / 2**20:.0f} MiB"
        )
    finally:
        daemon.stop()
