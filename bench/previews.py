"""3. Previews: time from submit to the first preview against one step, and what previews at
every step cost in total time against none (same daemon, jobs interleaved)."""

from __future__ import annotations

import time

from bench.common import (
    CACHE,
    PROMPT,
    Stats,
    default_model,
    model_label,
    model_parser,
    quiet,
    report,
    set_threads,
    start_daemon,
    table,
)
from sdbridge.wire.client import Client


def timed_job(client: Client, steps: int, preview_every: int, seed: int) -> dict[str, float]:
    """Arrival times (s after submit) of the events, stamped on the client's reader thread."""
    arrivals: list[tuple[str, float]] = []
    start = time.perf_counter()
    job = client.generate(
        prompt=PROMPT, num_inference_steps=steps, seed=seed, preview_every=preview_every
    )
    job.subscribe(lambda event: arrivals.append((event["event"], time.perf_counter() - start)))
    job.result(timeout=600)
    total = time.perf_counter() - start
    progress = [t for name, t in arrivals if name == "progress"]
    steps_s = [b - a for a, b in zip(progress, progress[1:], strict=False)]
    return {
        "total": total,
        "step": Stats.of(steps_s).median,
        "started": next(t for name, t in arrivals if name == "started"),
        "first_progress": progress[0],
        "first_preview": next((t for name, t in arrivals if name == "preview"), float("nan")),
    }


def main() -> None:
    p = model_parser(__doc__.splitlines()[0], repeats=7)
    args = p.parse_args()
    if args.quick:
        args.repeats, args.steps = 2, 4
    set_threads(args.threads)
    quiet()
    model = args.model or default_model(args.native)
    daemon = start_daemon(model, CACHE / "previews")
    runs: dict[int, list[dict[str, float]]] = {0: [], 1: []}
    try:
        with Client(daemon.address, timeout=60) as client:
            timed_job(client, args.steps, 1, 0)  # warm-up
            for repeat in range(args.repeats):
                order = (0, 1) if repeat % 2 == 0 else (1, 0)
                for every in order:
                    runs[every].append(timed_job(client, args.steps, every, repeat))
    finally:
        daemon.stop()

    print(
        f"model {model_label(model)}, {args.steps} steps, {args.threads} threads; times in ms, "
        f"median [min..max] over {args.repeats} runs"
    )
    rows = []
    for every, samples in runs.items():
        rows.append(
            [
                f"every {every} step" if every else "none",
                Stats.of([s["total"] for s in samples]).show(1e3, 0),
                Stats.of([s["step"] for s in samples]).show(1e3, 1),
                Stats.of([s["started"] for s in samples]).show(1e3, 1),
                Stats.of([s["first_progress"] for s in samples]).show(1e3, 1),
                Stats.of([s["first_preview"] for s in samples]).show(1e3, 1) if every else "-",
            ]
        )
    table(["previews", "total", "step", "started", "first progress", "first preview"], rows)
    with_previews = runs[1]
    late = Stats.of([s["first_preview"] - s["step"] for s in with_previews])
    cost = Stats.of([a["total"] / b["total"] for a, b in zip(runs[1], runs[0], strict=True)])
    print(f"first preview minus one step: {late.show(1e3, 1)} ms (target <= 20 ms)")
    print(f"total with previews / without: {cost.show(1, 3)} (target <= 1.05)")
    report("preview_cost_ratio", cost.median)


if __name__ == "__main__":
    main()
