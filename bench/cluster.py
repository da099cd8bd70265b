"""7. The cluster path (`sdbridge serve --cluster local`): throughput of 2 workers against 1 on a
batch of jobs, and one job's time through a cluster worker against the local daemon.

Three daemons run side by side on the same model, each worker and the local daemon on one torch
thread: the local daemon, a cluster daemon with one worker and one with two (each its own local
Ray). Throughput: a batch of jobs sent at once by two connections, wall time from the first
submit to the last result, on 1 worker and on 2, in alternating order. Overhead: one job at a
time (submit -> result in the client), cluster (1 worker) against local, alternating; the
cluster's pixels must equal the local daemon's or the comparison is refused.
"""

from __future__ import annotations

import time
from pathlib import Path

from bench.common import (
    CACHE,
    PROMPT,
    Stats,
    default_model,
    model_label,
    model_parser,
    report,
    set_threads,
    start_daemon,
    table,
)
from bench.overhead import pixels, wait_for_compression
from sdbridge.wire.client import Client


def job(client: Client, steps: int, seed: int) -> dict:
    return client.generate(prompt=PROMPT, num_inference_steps=steps, seed=seed)


def one_job(client: Client, steps: int) -> tuple[float, dict]:
    """Seconds from submit to the result in hand."""
    start = time.perf_counter()
    result = job(client, steps, seed=1).result(timeout=600)
    elapsed = time.perf_counter() - start
    wait_for_compression(result)
    return elapsed, result


def batch(clients: list[Client], steps: int, size: int) -> float:
    """Seconds from the first submit of `size` jobs (split between the connections) to the
    last result."""
    start = time.perf_counter()
    jobs = [job(clients[n % len(clients)], steps, seed=n) for n in range(size)]
    results = [submitted.result(timeout=600) for submitted in jobs]
    elapsed = time.perf_counter() - start
    for result in results:
        wait_for_compression(result)
    return elapsed


def main() -> None:
    p = model_parser(__doc__.splitlines()[0], repeats=7)
    p.add_argument("--batch", type=int, default=8, help="jobs per throughput run")
    args = p.parse_args()
    if args.quick:
        args.repeats, args.batch, args.steps = 2, 4, 4
    set_threads(args.threads)
    model: Path = args.model or default_model(args.native)
    print(
        f"model {model_label(model)}, {args.steps} steps, {args.threads} thread per worker and "
        f"in the local daemon, batches of {args.batch}"
    )
    out = CACHE / "cluster"
    daemons = {
        "local": start_daemon(model, out / "local"),
        "1 worker": start_daemon(model, out / "one", "--cluster", "local", "--workers", "1"),
        "2 workers": start_daemon(model, out / "two", "--cluster", "local", "--workers", "2"),
    }
    overhead: list[dict[str, float]] = []
    throughput: list[dict[str, float]] = []
    clients = {
        name: [Client(d.address, timeout=60) for _ in range(2)] for name, d in daemons.items()
    }
    try:
        local, one = clients["local"][0], clients["1 worker"][0]
        # Warm-up (each worker's first job), and the same pixels on both paths.
        for name in ("1 worker", "2 workers"):
            batch(clients[name], args.steps, 2)
        if pixels(one_job(one, args.steps)[1]) != pixels(one_job(local, args.steps)[1]):
            raise SystemExit("the cluster's pixels differ from the local daemon's")
        for repeat in range(args.repeats):
            # Alternate which side goes first, so drift on a shared machine cancels out.
            flip = repeat % 2 == 1
            times = {}
            for side, client in sorted({"local": local, "cluster": one}.items(), reverse=flip):
                times[side] = one_job(client, args.steps)[0]
            overhead.append(times)
            times = {}
            for side in sorted(("1 worker", "2 workers"), reverse=flip):
                times[side] = batch(clients[side], args.steps, args.batch)
            throughput.append(times)
    finally:
        for connections in clients.values():
            for client in connections:
                client.close()
        for daemon in daemons.values():
            daemon.stop()

    print(f"\nseconds, median [min..max] over {args.repeats} paired runs")
    overhead_ratio = Stats.of([t["cluster"] / t["local"] for t in overhead])
    speedup = Stats.of([t["1 worker"] / t["2 workers"] for t in throughput])
    table(
        ["measure", "A", "B", "ratio"],
        [
            [
                "one job: local daemon (A), cluster 1 worker (B)",
                Stats.of([t["local"] for t in overhead]).show(1, 3),
                Stats.of([t["cluster"] for t in overhead]).show(1, 3),
                f"{overhead_ratio.show(1, 3)} (B/A)",
            ],
            [
                f"batch of {args.batch}: 1 worker (A), 2 workers (B)",
                Stats.of([t["1 worker"] for t in throughput]).show(1, 2),
                Stats.of([t["2 workers"] for t in throughput]).show(1, 2),
                f"{speedup.show(1, 3)} (A/B)",
            ],
        ],
    )
    report("cluster_overhead_ratio", overhead_ratio.median)
    report("cluster_throughput_ratio", speedup.median)


if __name__ == "__main__":
    main()
