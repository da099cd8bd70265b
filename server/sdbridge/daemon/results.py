"""The daemon's memory of the images it saved, for the `results` op.

A client that lost its connection mid-job, or an editor restarted since, asks for its recent
results and gets them back: metadata and a thumbnail from memory, the picture itself read from
the saved PNG on request. The log holds the last `CAPACITY` images of this daemon run; older
ones are still in the output folder.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..wire.protocol import ResultsQuery, png_size
from .outputs import encode_png
from .parameters import GenerationInfo

CAPACITY = 500
THUMBNAIL_SIDE = 128
# A page with images ends early past this many bytes of them (always holding one result), so
# that an answer stays far below what any client takes in one message.
PAGE_IMAGE_BYTES = 64 << 20


@dataclass(frozen=True)
class ResultRecord:
    number: int  # from 1, in the order saved
    job: str
    index: int  # the image's place in its job (num_images)
    created: float  # Unix time
    info: GenerationInfo
    size: tuple[int, int]  # the image's, as sent in its `result`
    path: Path | None
    thumbnail: bytes  # PNG, fits in THUMBNAIL_SIDE x THUMBNAIL_SIDE
    thumbnail_size: tuple[int, int]
    # Who may list it: the connection that asked for it, and any with the same session key.
    connection: int
    session: str | None

    def to_dict(self, image: dict[str, Any] | None) -> dict[str, Any]:
        width, height = self.thumbnail_size
        small = {"width": width, "height": height, "format": "png", "data": self.thumbnail}
        return {
            "number": self.number,
            "job": self.job,
            "index": self.index,
            "created": self.created,
            "prompt": self.info.prompt,
            "negative_prompt": self.info.negative_prompt,
            "model": self.info.model,
            "seed": self.info.seed,
            "width": self.size[0],
            "height": self.size[1],
            "parameters": self.info.to_parameters(),
            "path": None if self.path is None else str(self.path),
            "thumbnail": small,
            "image": image,
        }


def thumbnail(image: Image.Image) -> tuple[bytes, tuple[int, int]]:
    """A PNG of ``image`` fitting in THUMBNAIL_SIDE per side, and its size."""
    small = image.convert("RGB")
    small.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE), Image.Resampling.BILINEAR)
    return encode_png(np.asarray(small), {}, compress=True), small.size


class ResultsLog:
    """The last `capacity` saved images, newest last; safe to use from any thread."""

    def __init__(self, capacity: int = CAPACITY) -> None:
        self._lock = threading.Lock()
        self._records: deque[ResultRecord] = deque(maxlen=capacity)
        self._numbers = iter(range(1, 2**63))

    def add(
        self,
        job: str,
        index: int,
        image: Image.Image,
        info: GenerationInfo,
        path: Path | None,
        connection: int,
        session: str | None,
    ) -> ResultRecord:
        small, size = thumbnail(image)
        with self._lock:
            record = ResultRecord(
                number=next(self._numbers),
                job=job,
                index=index,
                created=time.time(),
                info=info,
                size=image.size,
                path=path,
                thumbnail=small,
                thumbnail_size=size,
                connection=connection,
                session=session,
            )
            self._records.append(record)
        return record

    def page(self, query: ResultsQuery, visible: Callable[[ResultRecord], bool]) -> dict[str, Any]:
        """The `results` event's fields: the visible records before `query.before`, newest
        first, with their images read from disk when asked for."""
        with self._lock:
            records = list(self._records)
        found: list[dict[str, Any]] = []
        image_bytes = 0
        for record in reversed(records):
            if query.before is not None and record.number >= query.before:
                continue
            if not visible(record):
                continue
            if len(found) == query.limit or (image_bytes > PAGE_IMAGE_BYTES and found):
                return {"results": found, "more": True}
            image = read_image(record) if query.images else None
            image_bytes += len(image["data"]) if image else 0
            found.append(record.to_dict(image))
        return {"results": found, "more": False}


def read_image(record: ResultRecord) -> dict[str, Any] | None:
    """The record's PNG file as an image map, or None when it is gone or is no longer the
    image saved (moved, replaced, unreadable)."""
    if record.path is None:
        return None
    try:
        data = record.path.read_bytes()
        size = png_size(data)
    except (OSError, ValueError):
        return None
    if size != record.size:
        return None
    return {"width": size[0], "height": size[1], "format": "png", "data": data}


class ResultsBudget:
    """How many bytes of `results` answers each client address may still get, refilled over
    time: answers to a client that never reads would otherwise pile up in the daemon's memory
    as fast as the disk reads (a job's answers come no faster than the engine paints).

    A full budget is `burst` bytes; it refills at `burst / refill_s` bytes a second. An answer
    is sent while the budget is positive and spends what it holds (it may go below zero once).
    """

    def __init__(self, burst: int, refill_s: float) -> None:
        self.burst = burst
        self.rate = burst / refill_s
        self._left: dict[str, tuple[float, float]] = {}  # address -> (bytes, at monotonic time)

    def wait(self, address: str) -> float:
        """Seconds until `address` may be answered again; 0: now."""
        left = self._now(address)
        return 0.0 if left > 0 else -left / self.rate + 0.001

    def spend(self, address: str, size: int) -> None:
        self._left[address] = (self._now(address) - size, time.monotonic())
        # Forget the addresses whose budget is full again: the table stays as small as the
        # number of recent askers.
        full = [a for a in self._left if a != address and self._now(a) >= self.burst]
        for done in full:
            del self._left[done]

    def _now(self, address: str) -> float:
        left, at = self._left.get(address, (self.burst, 0.0))
        return min(self.burst, left + (time.monotonic() - at) * self.rate)
