"""4. Many clients: 1, 4 and 8 clients submitting at once against the same jobs one after another,
the longest wait of any client, and every job's terminal events counted on the wire; then a
prototype of batching compatible requests into one pipeline call against one call each.

Each client is its own ZMTP connection. The events are read raw (`ZmtpConnection`), not through
`Client`, whose `Job` drops a second terminal event by design: here such a bug must show.
"""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import torch

from bench.common import (
    CACHE,
    PROMPT,
    Stats,
    default_model,
    load_direct,
    model_label,
    model_parser,
    quiet,
    report,
    set_threads,
    start_daemon,
    table,
)
from sdbridge import protocol
from sdbridge.zmtp import ZmtpConnection, ZmtpError

# How long a connection keeps listening after its last terminal event for a stray second one.
GRACE_S = 0.5


class RawClient:
    """One connection that submits jobs and records every event with its arrival time."""

    def __init__(self, address: str) -> None:
        self.conn = ZmtpConnection.connect(address, 10.0)
        self.terminals: dict[str, int] = {}
        self.submitted: dict[str, float] = {}
        self.finished: dict[str, float] = {}

    def submit(self, job_id: str, steps: int, seed: int) -> None:
        request = {"v": 1, "op": "generate", "id": job_id, "prompt": PROMPT, "seed": seed}
        request["num_inference_steps"] = steps
        self.terminals[job_id] = 0
        self.submitted[job_id] = time.perf_counter()
        self.conn.send([protocol.pack(request)])

    def cancel(self, job_id: str) -> None:
        request = {"v": 1, "op": "cancel", "id": f"cancel-{job_id}", "job": job_id}
        self.conn.send([protocol.pack(request)])

    def read_until_done(self) -> None:
        """Read events until every job ended, then GRACE_S more for any late terminal event."""
        closer = threading.Timer(GRACE_S, self.conn.close)
        while True:
            try:
                event = protocol.unpack(self.conn.recv()[0])
            except ZmtpError:  # closed by the timer after the grace period
                return
            job_id = event.get("id")
            if event["event"] in protocol.TERMINAL_EVENTS and job_id in self.terminals:
                self.terminals[job_id] += 1
                self.finished.setdefault(job_id, time.perf_counter())
            if not closer.is_alive() and all(self.terminals.values()):
                closer.start()


def round_of(address: str, clients: int, steps: int, jobs_each: int, cancel: bool) -> dict:
    """``clients`` connections submit ``jobs_each`` jobs each at the same moment."""
    raws = [RawClient(address) for _ in range(clients)]
    barrier = threading.Barrier(clients)
    rng = random.Random(clients)

    def one(index: int, raw: RawClient) -> None:
        barrier.wait()
        ids = [f"c{index}-j{j}" for j in range(jobs_each)]
        for j, job_id in enumerate(ids):
            raw.submit(job_id, steps, seed=index * 100 + j)
        if cancel:  # cancel the last job at a random moment: queued, running or already done
            time.sleep(rng.random() * 0.05 * steps)
            raw.cancel(ids[-1])
        raw.read_until_done()

    start = time.perf_counter()
    threads = [threading.Thread(target=one, args=(i, r)) for i, r in enumerate(raws)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    ends = [t for raw in raws for t in raw.finished.values()]
    waits = [raw.finished[j] - raw.submitted[j] for raw in raws for j in raw.finished]
    return {
        "wall": max(ends) - start,
        "longest_wait": max(waits),
        "jobs": sum(len(raw.terminals) for raw in raws),
        "bad": sum(count != 1 for raw in raws for count in raw.terminals.values()),
    }


def batching(model: Path, steps: int, sizes: list[int], repeats: int) -> list[list[str]]:
    """N compatible requests as one pipeline call (a batch of N) against N calls."""
    pipe = load_direct(model)

    def call(seeds: list[int]) -> tuple[float, list[bytes]]:
        start = time.perf_counter()
        images = pipe(
            prompt=[PROMPT] * len(seeds),
            num_inference_steps=steps,
            generator=[torch.Generator().manual_seed(seed) for seed in seeds],
        ).images
        return time.perf_counter() - start, [image.tobytes() for image in images]

    call([0])  # warm-up
    rows = []
    for n in sizes:
        ratios, singles, batches, same = [], [], [], 0
        for _ in range(repeats):
            alone = [call([seed]) for seed in range(n)]
            batch, pixels = call(list(range(n)))
            singles.append(sum(t for t, _ in alone))
            batches.append(batch)
            ratios.append(singles[-1] / batch)
            same += sum(a == b for (_, [a]), b in zip(alone, pixels, strict=True))
        rows.append(
            [
                n,
                Stats.of(singles).show(1e3, 0),
                Stats.of(batches).show(1e3, 0),
                Stats.of(ratios).show(1, 2),
                f"{same}/{n * repeats}",
            ]
        )
    return rows


def main() -> None:
    p = model_parser(__doc__.splitlines()[0], repeats=3)
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8])
    args = p.parse_args()
    if args.quick:
        args.repeats, args.steps, args.clients = 1, 3, [1, 4]
    set_threads(args.threads)
    torch.set_num_threads(args.threads)
    quiet()
    model = args.model or default_model(args.native)
    daemon = start_daemon(model, CACHE / "clients")
    results: dict[int, list[dict]] = {n: [] for n in args.clients}
    sequential: list[float] = []
    try:
        round_of(daemon.address, 1, args.steps, 1, cancel=False)  # warm-up
        for _ in range(args.repeats):
            # The sequential reference: the same number of jobs, each submitted after the last.
            one = [round_of(daemon.address, 1, args.steps, 1, False) for _ in range(3)]
            sequential.append(Stats.of([r["wall"] for r in one]).median)
            for n in args.clients:
                results[n].append(round_of(daemon.address, n, args.steps, 1, cancel=False))
        chaos = round_of(daemon.address, max(args.clients), args.steps, 2, cancel=True)
    finally:
        daemon.stop()

    job_s = Stats.of(sequential)
    print(
        f"model {model_label(model)}, {args.steps} steps, {args.threads} threads; one job alone: "
        f"{job_s.show(1e3, 0)} ms; median [min..max] over {args.repeats} rounds"
    )
    rows, bad = [], chaos["bad"]
    for n, rounds in results.items():
        speed = Stats.of([n * s / r["wall"] for s, r in zip(sequential, rounds, strict=True)])
        rows.append(
            [
                n,
                Stats.of([r["wall"] for r in rounds]).show(1e3, 0),
                speed.show(1, 2),
                Stats.of([r["longest_wait"] for r in rounds]).show(1e3, 0),
                f"{sum(r['bad'] for r in rounds)}/{sum(r['jobs'] for r in rounds)}",
            ]
        )
        bad += sum(r["bad"] for r in rounds)
    table(["clients", "all done ms", "throughput vs sequential", "longest wait ms", "bad"], rows)
    print(
        f"cancel round ({max(args.clients)} clients x 2 jobs, one cancelled each): "
        f"{chaos['bad']}/{chaos['jobs']} jobs without exactly one terminal event"
    )

    print("\nbatching prototype: N requests as one pipeline call against N calls (in process)")
    table(
        ["N", "N calls ms", "one batch ms", "speed-up", "same pixels as alone"],
        batching(model, args.steps, [2, 4] if args.quick else [4, 8], args.repeats),
    )
    print(f"jobs without exactly one terminal event: {bad}")
    report("clients_bad_terminal_jobs", bad)


if __name__ == "__main__":
    main()
