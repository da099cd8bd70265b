"""What an editor session has generated: every image with where it was painted and how, so that
nothing is lost and any of it can be applied again or its settings reused.

Pure Python: it runs inside Krita and GIMP. Images are kept as the daemon sent them (raw RGBA);
the oldest go once the history holds more than `max_bytes` of pixels.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any

from .canvas import JobPlan
from .session import Result, Settings

MAX_BYTES = 256 << 20  # about 250 images of 512x512


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
