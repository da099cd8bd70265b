"""4. Many clients: 1, 4 and 8 clients submitting at once against the same jobs one after another,
the longest wait of any client, and every job's terminal events counted on the wire; queue
fairness: one client's job while another has 16 queued; then a prototype of batching compatible
requests into one pipeline call against one call each.

Fairness (issue #19): client A queues 16 jobs, then client B sends one job after A's k-th result
(k = 0, 4, 8, 12: one round each). B's wait (its `accepted` -> its `result`) is printed beside the
time A's 16 jobs took in the same round (A's first `accepted` -> A's last `result`: what B waits
when jobs run first come, first served) and their ratio. Run it against an older daemon by putting
its package first on the path: `PYTHONPATH=OLD_TREE/server python -m bench.clients`.

Each client is its own ZMTP connection. The events are read raw (`ZmtpConnection`), not through
`Client`, whose `Job` drops a second terminal event by design: here such a bug must show.
"""

from __future__ import annotations

import argparse
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
from sdbridge.wire import protocol
from sdbridge.wire.zmtp import ZmtpConnection, ZmtpError

PARTS = ["fairness", "clients", "batching"]
# How long a connection keeps listening after its last terminal event for a stray second one.
GRACE_S = 0.5


class RawClient:
    """One connection that submits jobs and records every event with its arrival time."""

    def __init__(self, address: str) -> None:
        self.conn = ZmtpConnection.connect(address, 10.0)
        self.terminals: dict[str, int] = {}
        self.submitted: dict[str, float] = {}
        self.accepted: dict[str, float] = {}
        self.finished: dict[str, float] = {}
        self.outcome: dict[str, str] = {}  # each job's first terminal event

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
            if event["event"] == "accepted" and job_id in self.terminals:
                self.accepted.setdefault(job_id, time.perf_counter())
            if event["event"] in protocol.TERMINAL_EVENTS and job_id in self.terminals:
                self.terminals[job_id] += 1
                self.finished.setdefault(job_id, time.perf_counter())
                self.outcome.setdefault(job_id, event["event"])
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


def fairness_round(address: str, steps: int, batch: int, after: int) -> dict:
    """A queues ``batch`` jobs; B sends one once A has ``after`` results. Times in seconds."""
    a, b = RawClient(address), RawClient(address)
    for j in range(batch):
        a.submit(f"a-j{j}", steps, seed=j)
    reader = threading.Thread(target=a.read_until_done)
    reader.start()
    while len(a.finished) < after or len(a.accepted) < batch:  # A's batch is all queued first
        time.sleep(0.002)
    b.submit("b", steps, seed=1000 + after)
    b.read_until_done()
    reader.join()
    for raw in (a, b):
        failed = {j: o for j, o in raw.outcome.items() if o != "result"}
        if failed or len(raw.outcome) != len(raw.terminals):
            raise RuntimeError(f"jobs did not all end in a result: {failed or raw.outcome}")
    return {
        "b_wait": b.finished["b"] - b.accepted["b"],
        "a_batch": max(a.finished.values()) - min(a.accepted.values()),
        # A's results that came after B's: 0 when B waited for the whole batch.
        "a_after_b": sum(t > b.finished["b"] for t in a.finished.values()),
        "bad": sum(count != 1 for raw in (a, b) for count in raw.terminals.values()),
        "jobs": batch + 1,
    }


def fairness(address: str, steps: int, batch: int, moments: list[int]) -> tuple[list, dict]:
    """One fairness round per moment, each after one job alone (the unit of the waits)."""
    rows, rounds = [], []
    for after in moments:
        alone = round_of(address, 1, steps, 1, cancel=False)["wall"]
        r = fairness_round(address, steps, batch, after)
        r["alone"] = alone
        rounds.append(r)
        rows.append(
            [
                f"after A's result {after}",
                f"{r['b_wait'] * 1e3:.0f}",
                f"{r['a_batch'] * 1e3:.0f}",
                f"{r['b_wait'] / r['a_batch']:.3f}",
                f"{r['b_wait'] / alone:.2f}",
                f"{r['a_after_b']}/{batch - after}",
            ]
        )
    worst = max(rounds, key=lambda r: r["b_wait"])
    return rows, worst | {
        "bad": sum(r["bad"] for r in rounds),
        "jobs": sum(r["jobs"] for r in rounds),
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
    p.add_argument("--parts", nargs="+", choices=PARTS, default=PARTS, help="what to measure")
    p.add_argument("--batch", type=int, default=16, help="fairness: A's queued jobs")
    p.add_argument(
        "--moments",
        type=int,
        nargs="+",
        default=[0, 4, 8, 12],
        help="fairness: B sends its job once A has this many results (one round each)",
    )
    args = p.parse_args()
    if args.quick:
        args.repeats, args.steps, args.clients, args.moments = 1, 3, [1, 4], [0, 8]
    set_threads(args.threads)
    torch.set_num_threads(args.threads)
    quiet()
    model = args.model or default_model(args.native)
    # A and B both connect from 127.0.0.1, and a daemon counts live jobs per address (since
    # 88994ea; per connection before): let the address hold A's batch and B's job.
    limit = ["--max-queue-per-client", str(args.batch + 1)]
    daemon = start_daemon(model, CACHE / "clients", *limit)
    results: dict[int, list[dict]] = {n: [] for n in args.clients}
    sequential: list[float] = []
    fair_rows, fair = [], None
    try:
        round_of(daemon.address, 1, args.steps, 1, cancel=False)  # warm-up
        if "fairness" in args.parts:
            fair_rows, fair = fairness(daemon.address, args.steps, args.batch, args.moments)
        for _ in range(args.repeats if "clients" in args.parts else 0):
            # The sequential reference: the same number of jobs, each submitted after the last.
            one = [round_of(daemon.address, 1, args.steps, 1, False) for _ in range(3)]
            sequential.append(Stats.of([r["wall"] for r in one]).median)
            for n in args.clients:
                results[n].append(round_of(daemon.address, n, args.steps, 1, cancel=False))
        if "clients" in args.parts:
            chaos = round_of(daemon.address, max(args.clients), args.steps, 2, cancel=True)
    finally:
        daemon.stop()

    print(
        f"model {model_label(model)}, {args.steps} steps, {args.threads} threads; "
        f"daemon and client from {Path(protocol.__file__).parent}"
    )
    bad = 0
    if fair is not None:
        show_fairness(fair_rows, fair, args.batch)
        bad += fair["bad"]
    if "clients" in args.parts:
        bad += show_clients(args, sequential, results, chaos)
    if "batching" in args.parts:
        print("\nbatching prototype: N requests as one pipeline call against N calls (in process)")
        table(
            ["N", "N calls ms", "one batch ms", "speed-up", "same pixels as alone"],
            batching(model, args.steps, [2, 4] if args.quick else [4, 8], args.repeats),
        )
    print(f"jobs without exactly one terminal event: {bad}")
    lines = [("clients_bad_terminal_jobs", bad)]
    if fair is not None:  # last (what `python -m bench` collects) when it is all that ran
        ratio = ("clients_fairness_longest_wait_ratio", fair["b_wait"] / fair["a_batch"])
        lines.insert(0 if "clients" in args.parts else 1, ratio)
    for name, value in lines:
        report(name, value)


def show_fairness(rows: list[list[str]], worst: dict, batch: int) -> None:
    print(
        f"\nfairness: A queues {batch} jobs, B sends one job once A has k results "
        f"(one round each; {worst['bad']}/{worst['jobs']} jobs without exactly one terminal event)"
    )
    table(
        [
            "B sends its job",
            "B wait ms",
            f"A's {batch} jobs ms",
            f"B wait / A's {batch}",
            "B wait in jobs alone",
            "A's jobs after B",
        ],
        rows,
    )
    wait, alone, whole = worst["b_wait"], worst["alone"], worst["a_batch"]
    print(
        f"longest wait of B: {wait * 1e3:.0f} ms = {wait / alone:.2f} jobs alone; A's {batch} "
        f"jobs in that round (B's wait under first come, first served): {whole * 1e3:.0f} ms; "
        f"ratio {wait / whole:.3f}"
    )


def show_clients(
    args: argparse.Namespace, sequential: list[float], results: dict[int, list[dict]], chaos: dict
) -> int:
    """The many-clients table; returns its jobs without exactly one terminal event."""
    job_s = Stats.of(sequential)
    print(f"\none job alone: {job_s.show(1e3, 0)} ms; median [min..max] over {args.repeats} rounds")
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
    return bad


if __name__ == "__main__":
    main()
