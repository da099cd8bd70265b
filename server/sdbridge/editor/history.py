"""What an editor session has generated: every image with where it was painted and how, so that
nothing is lost and any of it can be applied again or its settings reused.

Pure Python: it runs inside Krita and GIMP. Images are kept as the daemon sent them (raw RGBA);
the oldest go once the history holds more than `max_bytes` of pixels.

A job whose connection dropped while it ran still ends on the daemon, which saves its images
and lists them with `results`: `LostJobs` remembers such jobs until their images are found
there, so that they join the history like any other.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from ..wire.protocol import MAX_RESULTS_PAGE
from .canvas import JobPlan
from .results import ResultsPage, SavedResult
from .session import Result, ResultImage, Settings

MAX_BYTES = 256 << 20  # about 250 images of 512x512
# A lost job is looked for this long: longer than any job runs, shorter than the daemon keeps
# its results listed (its last 500).
LOST_FOR_S = 15 * 60.0
# The first look comes at once on reconnecting; then, while the job may still be running,
# again after 1 s, 2 s, 4 s ... at most this far apart.
MAX_LOOK_INTERVAL_S = 30.0


@dataclass(frozen=True)
class HistoryItem:
    number: int  # unique in its history, counting up
    image: Mapping[str, Any]  # the raw wire image
    settings: Settings  # the job's settings, with this image's seed fixed
    plan: JobPlan  # where it was painted: its place on the canvas, its selection
    parameters: str  # the daemon's A1111 text: what really ran (defaults filled in)
    path: str | None  # the daemon's saved copy

    @property
    def seed(self) -> int:
        assert self.settings.seed is not None
        return self.settings.seed

    @property
    def size_bytes(self) -> int:
        return len(self.image["data"])


class History:
    """The session's results, newest first."""

    def __init__(self, max_bytes: int = MAX_BYTES) -> None:
        self.max_bytes = max_bytes
        self._items: list[HistoryItem] = []
        self._bytes = 0
        self._numbers = itertools.count(1)

    def __iter__(self) -> Iterator[HistoryItem]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def add(self, settings: Settings, plan: JobPlan, result: Result) -> list[HistoryItem]:
        """Every image of a finished job, in the job's order; returns the new items."""
        added = [
            HistoryItem(
                next(self._numbers),
                image.image,
                replace(settings, seed=image.seed, num_images=1),
                plan,
                image.parameters,
                image.path,
            )
            for image in result.images
        ]
        self._items[:0] = added
        self._bytes += sum(item.size_bytes for item in added)
        while len(self._items) > 1 and self._bytes > self.max_bytes:
            self._bytes -= self._items.pop().size_bytes
        return added

    def get(self, number: int) -> HistoryItem | None:
        return next((item for item in self._items if item.number == number), None)


@dataclass(frozen=True)
class LostJob:
    """A job whose `result` never came: the connection dropped while the daemon ran it."""

    job: str  # the `generate` request's id, which `results` lists its images under
    settings: Settings
    plan: JobPlan
    where: Any = None  # what the front-end needs to place it (Krita: its document)
    lost_at: float = 0.0  # monotonic time


def result_of(found: Sequence[SavedResult], images: Sequence[Mapping[str, Any]]) -> Result:
    """The `Result` a lost job's `result` event would have been: its saved results, in the
    job's order, with their images decoded to raw RGBA (`images`, in the same order)."""
    return Result(
        tuple(
            ResultImage(image, saved.seed, saved.path, saved.parameters)
            for saved, image in zip(found, images, strict=True)
        ),
        0.0,
        None,
    )


def images_page(page: ResultsPage, jobs: Collection[str]) -> tuple[int, int] | None:
    """`before` and `limit` of the page that holds the images of those `jobs` whose results
    `page` (listed without images) shows; None when it shows none."""
    numbers = [saved.number for saved in page.results if saved.job in jobs]
    if not numbers:
        return None
    return max(numbers) + 1, min(MAX_RESULTS_PAGE, max(numbers) - min(numbers) + 1)


class LostJobs:
    """The session's jobs whose results are still to be fetched from the daemon's list."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._jobs: dict[str, LostJob] = {}
        self._looks = 0  # since the last reconnection: spaces the next look

    def __bool__(self) -> bool:
        return bool(self._jobs)

    @property
    def ids(self) -> frozenset[str]:
        return frozenset(self._jobs)

    def add(self, job: str, settings: Settings, plan: JobPlan, where: Any = None) -> None:
        self._jobs[job] = LostJob(job, settings, plan, where, self._clock())

    def reconnected(self) -> None:
        """A new connection: look at once, then soon again."""
        self._looks = 0

    def next_look_s(self) -> float:
        """How long to wait before the next look at the daemon's list."""
        self._looks += 1
        return min(MAX_LOOK_INTERVAL_S, 2.0 ** (self._looks - 1))

    def found(self, page: ResultsPage) -> list[tuple[LostJob, tuple[SavedResult, ...]]]:
        """The lost jobs whose every image `page` lists, with those results in the job's order;
        they are no longer lost. Jobs lost longer than LOST_FOR_S ago are given up."""
        now = self._clock()
        done = []
        for job in list(self._jobs.values()):
            saved = sorted((s for s in page.results if s.job == job.job), key=lambda s: s.index)
            if len(saved) >= job.settings.num_images:
                done.append((job, tuple(saved)))
            if len(saved) >= job.settings.num_images or now - job.lost_at > LOST_FOR_S:
                del self._jobs[job.job]
        return done
