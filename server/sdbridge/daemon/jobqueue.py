"""The daemon's waiting jobs: served round robin across connections, in order within one.

First come, first served would make one artist's batch of 16 hold every other artist up for all
of it. Here each connection waiting takes one job in turn; the connection served longest ago
(or never) goes first, so a newcomer's job runs next, after the job that is running.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Hashable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class FairQueue(Generic[T]):
    """Jobs grouped by owner (a connection); `pop` takes the next one round robin."""

    def __init__(self) -> None:
        self._waiting: dict[Hashable, deque[T]] = {}
        # Owner -> (turn it was last served, -1 for never; the order it first queued): owners
        # are served in this order. Kept while the owner lives, so that emptying its queue and
        # queueing again does not jump ahead of owners who waited.
        self._rank: dict[Hashable, tuple[int, int]] = {}
        self._turns = itertools.count()
        self._arrivals = itertools.count()

    def __len__(self) -> int:
        return sum(len(jobs) for jobs in self._waiting.values())

    def __bool__(self) -> bool:
        return bool(self._waiting)

    def __iter__(self) -> Iterator[T]:
        """The waiting jobs in the order they will run if nothing else arrives."""
        owners = sorted(self._waiting, key=self._rank.__getitem__)
        for row in itertools.zip_longest(*(self._waiting[owner] for owner in owners)):
            yield from (job for job in row if job is not None)

    def push(self, owner: Hashable, job: T) -> int:
        """Queue ``job`` last among its owner's; returns its position among the waiting."""
        if owner not in self._rank:
            self._rank[owner] = (-1, next(self._arrivals))
        self._waiting.setdefault(owner, deque()).append(job)
        return next(index for index, waiting in enumerate(self) if waiting is job)

    def pop(self) -> T:
        """The next job: the first of the owner served longest ago. IndexError when empty."""
        if not self._waiting:
            raise IndexError("pop from an empty FairQueue")
        owner = min(self._waiting, key=self._rank.__getitem__)
        jobs = self._waiting[owner]
        job = jobs.popleft()
        if not jobs:
            del self._waiting[owner]
        self._rank[owner] = (next(self._turns), self._rank[owner][1])
        return job

    def remove(self, owner: Hashable, job: T) -> None:
        """Take a waiting job out (cancelled). ValueError if it is not waiting."""
        jobs = self._waiting.get(owner)
        if jobs is None:
            raise ValueError("the job is not waiting")
        jobs.remove(job)
        if not jobs:
            del self._waiting[owner]

    def drop(self, owner: Hashable) -> list[T]:
        """Forget an owner that is gone: returns its waiting jobs, removed."""
        self._rank.pop(owner, None)
        return list(self._waiting.pop(owner, ()))

    def clear(self) -> list[T]:
        """Remove every waiting job; returns them in their running order."""
        jobs = list(self)
        self._waiting.clear()
        return jobs
