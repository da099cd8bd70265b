"""8. A studio on many GPUs, simulated: the cluster daemon's placement (model affinity) against a
round robin that ignores models, on throughput and on the 95th percentile wait.

No GPU and no Ray: a discrete-event simulation of the daemon's own scheduling, with the real
`FairQueue` (jobqueue.py) and the real `placement.choose`. Whenever a worker is idle the fair
queue's next job is placed on an idle worker, as the daemon's worker threads do. Each worker holds
one model (`max_loaded_models = 1`); a job on another model first pays that model's switch.

The studio: artists (one connection each) with a favourite model (9 jobs in 10 on it), think
time between seeing a result and sending again (exponential), one submission in five a batch of
four variations; three models (an SDXL-class model, an SD 1.5-class one, a few-step turbo model)
with GPU job times and switch times (read from the page cache, moved to the GPU) as below, each
job's time varying by +-30%. Wait: from submit to the job's first step (queue and switch).
"""

from __future__ import annotations

import heapq
import itertools
import random
import statistics
from collections import Counter
from dataclasses import dataclass, field

from bench.common import Stats, parser, report, table
from sdbridge.daemon.jobqueue import FairQueue
from sdbridge.daemon.placement import Candidate, choose


@dataclass(frozen=True)
class Model:
    name: str
    share: float  # of the artists who favour it
    job_s: float  # one job on a GPU
    switch_s: float  # loading it in place of another


MODELS = [
    Model("sdxl", 0.50, 6.0, 12.0),
    Model("sd15", 0.35, 2.0, 5.0),
    Model("turbo", 0.15, 0.6, 10.0),
]
FAVOURITE = 0.9  # of an artist's jobs on its favourite model
BATCH_SHARE, BATCH = 0.2, 4  # one submission in five is a batch of four
THINK_S = 30.0  # mean time between a result and the next submission
WARM_UP_S = 300.0  # not counted: the workers start on the first model


@dataclass(eq=False)
class Job:
    artist: int
    model: Model
    work_s: float
    submitted: float
    started: float = 0.0
    switched: bool = False  # its worker had to load its model first


@dataclass(eq=False)
class Worker:
    index: int
    model: str
    idle_since: float = 0.0
    busy: bool = False


@dataclass
class Run:
    """One simulated studio under one policy."""

    workers: int
    artists: int
    policy: str
    hours: float
    seed: int
    done: list[Job] = field(default_factory=list)

    def simulate(self) -> Run:
        rng = random.Random(self.seed)
        end = self.hours * 3600
        pool = [Worker(n, MODELS[0].name) for n in range(self.workers)]
        queue: FairQueue[Job] = FairQueue()
        events: list[tuple[float, int, str, object]] = []
        order = itertools.count()
        favourites = rng.choices(MODELS, [m.share for m in MODELS], k=self.artists)
        outstanding = Counter[int]()
        turn = itertools.count()

        def submit(now: float, artist: int) -> None:
            count = BATCH if rng.random() < BATCH_SHARE else 1
            model = favourites[artist]
            if rng.random() > FAVOURITE:
                model = rng.choice([m for m in MODELS if m is not model])
            for _ in range(count):
                work = model.job_s * rng.uniform(0.7, 1.3)
                queue.push(artist, Job(artist, model, work, now))
            outstanding[artist] += count

        def dispatch(now: float) -> None:
            while queue and any(not w.busy for w in pool):
                job = queue.pop()
                idle = [w for w in pool if not w.busy]
                worker = self._place(idle, pool, job.model.name, next(turn))
                job.switched = worker.model != job.model.name
                worker.model, worker.busy = job.model.name, True
                job.started = now + (job.model.switch_s if job.switched else 0.0)
                heapq.heappush(
                    events, (job.started + job.work_s, next(order), "done", (worker, job))
                )

        for artist in range(self.artists):  # the studio arrives over the first minute
            heapq.heappush(events, (rng.uniform(0, 60), next(order), "submit", artist))
        while events:
            now, _, kind, payload = heapq.heappop(events)
            if now > end:
                break
            if kind == "submit":
                submit(now, payload)
            else:
                worker, job = payload
                worker.busy, worker.idle_since = False, now
                if job.submitted >= WARM_UP_S:
                    self.done.append(job)
                outstanding[job.artist] -= 1
                if not outstanding[job.artist]:
                    think = rng.expovariate(1 / THINK_S)
                    heapq.heappush(events, (now + think, next(order), "submit", job.artist))
            dispatch(now)
        return self

    def _place(self, idle: list[Worker], pool: list[Worker], model: str, turn: int) -> Worker:
        if self.policy == "round robin":
            return idle[turn % len(idle)]
        holders = Counter(w.model for w in pool)
        candidates = [Candidate(w.index, (w.model,), w.idle_since) for w in idle]
        return pool[choose(candidates, model, holders).index]

    @property
    def jobs_per_minute(self) -> float:
        return len(self.done) / ((self.hours * 3600 - WARM_UP_S) / 60)

    def wait(self, quantile: float) -> float:
        waits = sorted(job.started - job.submitted for job in self.done)
        return waits[min(len(waits) - 1, int(quantile * len(waits)))]


def main() -> None:
    p = parser(__doc__.splitlines()[0], repeats=5)  # --threads: accepted, unused (no torch)
    p.add_argument("--hours", type=float, default=4.0, help="simulated hours per run")
    p.add_argument("--workers", type=int, nargs="+", default=[8, 32])
    p.add_argument("--artists-per-worker", type=float, nargs="+", default=[1.0, 2.0, 3.0])
    args = p.parse_args()
    if args.quick:
        args.repeats, args.hours = 2, 1.0
    for m in MODELS:
        print(f"{m.name}: favoured by {m.share:.0%}, job {m.job_s} s, switch {m.switch_s} s")
    print(f"think {THINK_S:.0f} s; {args.hours:g} h per run; {args.repeats} seeds")
    rows, ratios = [], []
    for workers in args.workers:
        for per_worker in args.artists_per_worker:
            artists = round(workers * per_worker)
            runs = {
                policy: [
                    Run(workers, artists, policy, args.hours, seed).simulate()
                    for seed in range(args.repeats)
                ]
                for policy in ("affinity", "round robin")
            }
            for policy, done in runs.items():
                jobs = [job for r in done for job in r.done]
                rows.append(
                    [
                        workers,
                        artists,
                        policy,
                        Stats.of([r.jobs_per_minute for r in done]).show(1, 1),
                        Stats.of([r.wait(0.5) for r in done]).show(1, 1),
                        Stats.of([r.wait(0.95) for r in done]).show(1, 1),
                        f"{100 * sum(job.switched for job in jobs) / len(jobs):.1f}",
                    ]
                )
            pairs = zip(*runs.values(), strict=True)
            ratios.append(
                statistics.median(a.jobs_per_minute / rr.jobs_per_minute for a, rr in pairs)
            )
    print("jobs/min and waits (s): median [min..max] over the seeds")
    table(
        ["workers", "artists", "policy", "jobs/min", "p50 wait", "p95 wait", "switches/100"],
        rows,
    )
    report("affinity_throughput_over_round_robin", max(ratios))


if __name__ == "__main__":
    main()
