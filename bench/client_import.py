"""6. What an editor plugin imports (the editor session and the client) in a fresh interpreter:
import time and memory (no numpy or torch may load), then the daemon's idle memory (RSS)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import psutil

from bench.common import CACHE, REPO, Stats, parser, report, start_daemon, table

# Runs in a fresh interpreter: the cost of what a plugin imports, on top of a bare Python.
PROBE = """
import json, os, sys, time
def rss_kib():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024
before = rss_kib()
start = time.perf_counter()
import sdbridge.editor.session
elapsed = time.perf_counter() - start
after = rss_kib()
heavy = sorted(m for m in ("numpy", "torch", "PIL", "zmq", "diffusers") if m in sys.modules)
print(json.dumps({"s": elapsed, "kib": after - before, "heavy": heavy, "n": len(sys.modules)}))
"""
TARGET_S = 0.050


def probe() -> dict:
    done = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=REPO, capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout)


def idle_rss(settle_s: float) -> tuple[str, float, float]:
    """The daemon with its default model (no --model): RSS once ready, and after one job."""
    from sdbridge import tiny
    from sdbridge.wire.client import Client

    if not tiny.is_present():
        return "the embedded model is not trained yet", float("nan"), float("nan")
    daemon = start_daemon(tiny.MODEL_DIR, CACHE / "idle")
    try:
        process = psutil.Process(daemon.process.pid)
        time.sleep(settle_s)
        ready = process.memory_info().rss
        with Client(daemon.address, timeout=60) as client:
            client.generate(prompt="a red circle", seed=1).result(timeout=600)
        time.sleep(settle_s)
        return tiny.NAME, ready / 2**20, process.memory_info().rss / 2**20
    finally:
        daemon.stop()


def main() -> None:
    p = parser(__doc__.splitlines()[0], repeats=15)
    args = p.parse_args()
    if args.quick:
        args.repeats = 3
    probe()  # warms the page cache and the bytecode cache
    runs = [probe() for _ in range(args.repeats)]
    heavy = sorted({m for run in runs for m in run["heavy"]})
    assert not heavy, f"importing sdbridge.editor.session loaded {heavy}"
    seconds = Stats.of([run["s"] for run in runs])
    memory = Stats.of([run["kib"] / 1024 for run in runs])
    name, ready, after_job = idle_rss(0.5 if args.quick else 2.0)
    print(f"fresh interpreter, median [min..max] over {args.repeats} runs")
    table(
        ["what", "value"],
        [
            ["import sdbridge.editor.session, ms", seconds.show(1e3, 1)],
            ["its memory (RSS growth), MiB", memory.show(1, 1)],
            ["modules loaded in all", runs[0]["n"]],
            ["numpy / torch / PIL / zmq loaded", "none"],
            [f"daemon RSS idle, {name}, MiB", f"{ready:.0f}"],
            ["daemon RSS after one job, MiB", f"{after_job:.0f}"],
        ],
    )
    print(f"target: import < {TARGET_S * 1e3:.0f} ms")
    report("client_import_ms", seconds.median * 1e3)


if __name__ == "__main__":
    main()
