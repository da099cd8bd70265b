"""The daemon's memory of the images it saved, for the `results` op.

A client that lost its connection mid-job, or an editor restarted since, asks for its recent
results and gets them back: metadata and a thumbnail from memory, the picture itself read from
the saved PNG on request. The log holds the last `CAPACITY` saved images, of this daemon run and
(from an index file in the output folder) of earlier ones; older ones are still in the folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
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
from .outputs import encode_png, write_atomically
from .parameters import GenerationInfo

CAPACITY = 500
# In the output folder: one JSON line per saved image, read back after a restart.
INDEX_NAME = ".sdbridge-results.jsonl"
THUMBNAIL_SIDE = 128
# A page with images ends early past this many bytes of them (always holding one result), so
# that an answer stays far below what any client takes in one message.
PAGE_IMAGE_BYTES = 64 << 20
_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResultRecord:
    number: int  # from 1, in the order saved, counting on across restarts
    job: str
    index: int  # the image's place in its job (num_images)
    created: float  # Unix time
    prompt: str
    negative_prompt: str
    model: str
    seed: int
    parameters: str  # the A1111 text
    size: tuple[int, int]  # the image's, as sent in its `result`
    path: Path | None
    thumbnail: bytes  # PNG, fits in THUMBNAIL_SIDE x THUMBNAIL_SIDE
    thumbnail_size: tuple[int, int]
    # Who may list it: the connection that asked for it (0: one of an earlier run), and any
    # connection whose session key has this digest.
    connection: int
    owner: str | None

    def _described(self) -> dict[str, Any]:
        """What the wire and the index both carry."""
        return {
            "number": self.number,
            "job": self.job,
            "index": self.index,
            "created": self.created,
            "prompt": self.prompt,
            "negative_prompt": self.negative_prompt,
            "model": self.model,
            "seed": self.seed,
            "parameters": self.parameters,
        }

    def to_dict(self, image: dict[str, Any] | None, mine: bool) -> dict[str, Any]:
        width, height = self.thumbnail_size
        return {
            **self._described(),
            "width": self.size[0],
            "height": self.size[1],
            "path": None if self.path is None else str(self.path),
            "thumbnail": {
                "width": width,
                "height": height,
                "format": "png",
                "data": self.thumbnail,
            },
            "image": image,
            "mine": mine,
        }

    def to_line(self, root: Path) -> str:
        """The record as a line of the index (without the thumbnail, made again from the file)."""
        assert self.path is not None
        entry = {
            **self._described(),
            "path": self.path.relative_to(root).as_posix(),
            "size": list(self.size),
            "owner": self.owner,
        }
        return json.dumps(entry, ensure_ascii=False) + "\n"


def owner_of(session: str | None) -> str | None:
    """What the daemon keeps of a session key: a digest, so that the index on disk does not
    hold the keys themselves (a key is 128 random bits: its digest does not give it away)."""
    return None if session is None else hashlib.sha256(session.encode()).hexdigest()


def thumbnail(image: Image.Image) -> tuple[bytes, tuple[int, int]]:
    """A PNG of ``image`` fitting in THUMBNAIL_SIDE per side, and its size."""
    small = image.convert("RGB")
    small.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE), Image.Resampling.BILINEAR)
    return encode_png(np.asarray(small), {}, compress=True), small.size


class ResultsLog:
    """The last `capacity` saved images, newest last; safe to use from any thread.

    With an output folder, each saved image is also appended to an index file there, and
    `restore` reads the last ones back after a restart (their thumbnails made again from the
    files), so that `results` lists what earlier runs saved too.
    """

    def __init__(self, root: Path | None = None, capacity: int = CAPACITY) -> None:
        self.root = root
        self.capacity = capacity
        self._lock = threading.Lock()
        self._records: deque[ResultRecord] = deque(maxlen=capacity)
        self._index_failed = False
        # The index's last lines, for `restore`; numbers go on from theirs at once, so that
        # this run's never repeat an earlier run's, even while `restore` is still reading.
        self._earlier = [] if self.index_path is None else _tail_lines(self.index_path, capacity)
        # A line a crash cut short: the next one starts on a line of its own.
        self._cut_short = bool(self._earlier) and not self._earlier[-1].endswith("\n")
        self._next_number = 1 + max(map(_number, self._earlier), default=0)
        self._index_lines = len(self._earlier)
        # Set once `restore` has run (at once without an index): `page` waits for it.
        self.restored = threading.Event()
        if root is None:
            self.restored.set()

    @property
    def index_path(self) -> Path | None:
        return None if self.root is None else self.root / INDEX_NAME

    def add(
        self,
        job: str,
        index: int,
        image: Image.Image,
        info: GenerationInfo,
        path: Path | None,
        connection: int,
        owner: str | None,
    ) -> ResultRecord:
        """`owner`: the digest of the asking connection's session key (`owner_of`)."""
        small, size = thumbnail(image)
        with self._lock:
            record = ResultRecord(
                number=self._next_number,
                job=job,
                index=index,
                created=time.time(),
                prompt=info.prompt,
                negative_prompt=info.negative_prompt,
                model=info.model,
                seed=info.seed,
                parameters=info.to_parameters(),
                size=image.size,
                path=path,
                thumbnail=small,
                thumbnail_size=size,
                connection=connection,
                owner=owner,
            )
            self._next_number += 1
            if path is not None:  # a name freed by deleting its file: the old entry is gone
                self._forget(path)
            self._records.append(record)
            self._append(record)
        return record

    def _forget(self, path: Path) -> None:
        """Drop the entries of `path` (under the lock): the output folder numbers its files
        from the highest one there, so deleting the newest file frees its name for the next."""
        if any(record.path == path for record in self._records):
            kept = [record for record in self._records if record.path != path]
            self._records = deque(kept, maxlen=self.capacity)

    def _append(self, record: ResultRecord) -> None:
        """One line in the index (under the lock: lines never interleave); a failure costs only
        the listing after a restart, and is logged once."""
        index = self.index_path
        if index is None or record.path is None:
            return
        try:
            line = record.to_line(index.parent)
            with open(index, "a", encoding="utf-8") as out:
                out.write("\n" + line if self._cut_short else line)
            self._cut_short = False
            self._index_lines += 1
            if self._index_lines > 2 * self.capacity and self.restored.is_set():
                # A daemon that runs for weeks: the index keeps what is listed, no more.
                kept = [r.to_line(index.parent) for r in self._records if r.path is not None]
                write_atomically(index, "".join(kept).encode())
                self._index_lines = len(kept)
        except (OSError, ValueError) as exc:  # ValueError: a path outside the folder
            if not self._index_failed:
                self._index_failed = True
                _log.warning("cannot note results in %s (kept until restart): %s", index, exc)

    def restore(self) -> None:
        """Read the index's last `capacity` entries whose files are still there. Run it once,
        off the socket's thread: it decodes each file for its thumbnail."""
        try:
            lines, self._earlier = self._earlier, []
            restored = [record for line in lines if (record := self._parse(line)) is not None]
            with self._lock:  # before this run's, which may have come meanwhile
                records = [*restored, *self._records]
                last = {record.path: i for i, record in enumerate(records)}
                # A later entry of a file name wins (see `_forget`).
                kept = (r for i, r in enumerate(records) if r.path is None or last[r.path] == i)
                self._records = deque(kept, maxlen=self.capacity)
        finally:
            self.restored.set()

    def _parse(self, line: str) -> ResultRecord | None:
        assert self.root is not None
        try:
            entry = json.loads(line)
            path = self.root / entry["path"]
            if not path.resolve().is_relative_to(self.root.resolve()) or path.suffix != ".png":
                return None  # the index names only the folder's own images
            with Image.open(path) as image:
                if list(image.size) != entry["size"]:
                    return None  # replaced by another picture
                small, size = thumbnail(image)
            return ResultRecord(
                number=int(entry["number"]),
                job=str(entry["job"]),
                index=int(entry["index"]),
                created=float(entry["created"]),
                prompt=str(entry["prompt"]),
                negative_prompt=str(entry["negative_prompt"]),
                model=str(entry["model"]),
                seed=int(entry["seed"]),
                parameters=str(entry["parameters"]),
                size=(int(entry["size"][0]), int(entry["size"][1])),
                path=path,
                thumbnail=small,
                thumbnail_size=size,
                connection=0,
                owner=entry["owner"] if isinstance(entry["owner"], str) else None,
            )
        except (OSError, ValueError, KeyError, TypeError, IndexError, Image.DecompressionBombError):
            return None  # a damaged line, or a file gone, moved or unreadable

    def page(
        self,
        query: ResultsQuery,
        visible: Callable[[ResultRecord], bool],
        mine: Callable[[ResultRecord], bool],
    ) -> dict[str, Any]:
        """The `results` event's fields: the visible records before `query.before`, newest
        first, with their images read from disk when asked for, each marked `mine` or not."""
        self.restored.wait()
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
            found.append(record.to_dict(image, mine(record)))
        return {"results": found, "more": False}


def _number(line: str) -> int:
    try:
        number = json.loads(line)["number"]
    except (ValueError, KeyError, TypeError):
        return 0
    return number if isinstance(number, int) and not isinstance(number, bool) else 0


def _tail_lines(path: Path, count: int) -> list[str]:
    """The last `count` lines of a text file (all of it when shorter); none when it is absent.
    An index grown past twice that is cut back to them, replaced whole."""
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)
        kept = lines[-count:]
        if len(lines) > 2 * count:
            write_atomically(path, "".join(kept).encode())
    except OSError as exc:  # absent (a first run), or unreadable: nothing earlier to list
        if not isinstance(exc, FileNotFoundError):
            _log.warning("cannot read the results of earlier runs from %s: %s", path, exc)
        return []
    return kept


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
