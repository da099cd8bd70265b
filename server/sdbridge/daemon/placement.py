"""Which idle cluster worker runs the next job: the one that already holds its model.

The daemon takes jobs from its fair queue in turn (jobqueue.py), as without a cluster; placement
only chooses among the workers idle at that moment, so fairness between connections is kept
exactly. A model switch costs seconds to minutes (read from disk, moved to the device), so:

1. an idle worker holding the job's model runs it, the one idle longest first;
2. else an idle worker switches to it, preferably one whose models other workers hold too, so
   that the only copy of a model is evicted last.

The trade-off: a job never waits for a busy worker that holds its model while another is idle;
it pays the switch instead. No Ray here: `bench/simulate_cluster.py` runs this same function
against a round robin that ignores models (docs/cluster.md).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Candidate:
    """An idle worker as placement sees it."""

    index: int  # the worker's place in the pool
    models: tuple[str, ...]  # the models it holds
    idle_since: float


def choose(idle: Sequence[Candidate], model: str, holders: Counter[str]) -> Candidate:
    """The idle worker to run a job on `model` (`idle` is not empty). `holders`: how many
    workers, busy or idle, hold each model."""
    holding = [c for c in idle if model in c.models]
    if holding:
        return min(holding, key=lambda c: c.idle_since)
    # A switch evicts; it loses least where every model the worker holds has another copy.
    return min(idle, key=lambda c: (sum(holders[m] == 1 for m in c.models), c.idle_since))
