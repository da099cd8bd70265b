"""A folder's files by name, rescanned on request: what the LoRA and ControlNet registries share.

Names are keys, never paths. A rescan may run on any thread while others read: the new listing
is built aside and swapped in with one assignment.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Generic, Protocol, TypeVar


class Named(Protocol):
    @property
    def name(self) -> str: ...


E = TypeVar("E", bound=Named)


class FolderListing(Generic[E]):
    """Entries of `folder` (None or missing: none) by name; subclasses say what `scan` finds.
    `fixed` entries (those shipped in the package) come first; a folder's of the same name
    replaces one."""

    def __init__(self, folder: Path | None, fixed: Sequence[E] = ()) -> None:
        self.folder = folder
        self._fixed = tuple(fixed)
        self._refreshing = threading.Lock()  # one rescan at a time: the newest scan publishes last
        self._entries: dict[str, E] = {}  # replaced whole, never changed in place
        self.refresh()

    def scan(self, folder: Path) -> Iterable[E]:
        raise NotImplementedError

    def refresh(self) -> None:
        with self._refreshing:
            found = self.scan(self.folder) if self.folder and self.folder.is_dir() else ()
            self._entries = {entry.name: entry for entry in (*self._fixed, *found)}

    def get(self, name: str) -> E | None:
        return self._entries.get(name)

    def entries(self) -> list[E]:
        return list(self._entries.values())
