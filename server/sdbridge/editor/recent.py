"""Putting one of the daemon's saved results back into the editor: the `results` op as a
"Recent results" entry uses it, and what to tell the artist when there is nothing to place.

Pure Python: it runs inside Krita and GIMP.
"""

from __future__ import annotations

import time

from ..wire.client import ClientError
from ..wire.protocol import ErrorCode
from .results import ResultsPage, SavedResult
from .session import Session

PAGE_SIZE = 20  # results per page of a list: thumbnails only, a few hundred kB


class RecentError(Exception):
    """Nothing can be placed; the message is a sentence for the artist."""


class NoSuchResult(RecentError):
    """The caller asked for a result number this session is not shown."""


def list_results(
    session: Session, before: int | None = None, limit: int = PAGE_SIZE
) -> ResultsPage:
    """A page of results to pick from, newest first, with thumbnails only. The first page
    (`before` None) holds at least one result, else RecentError says why it is empty."""
    page = _results(session, before=before, limit=limit)
    if before is None and not page.results:
        raise RecentError(_nothing_text(session.address))
    return page


def fetch_result(session: Session, number: int = 0) -> SavedResult:
    """Result `number` (0: the newest this session may see) with its picture; only that one
    page is asked for with images."""
    page = _results(session, before=number + 1 if number else None, limit=1, images=True)
    found = page.results[0] if page.results else None
    if found is None and not number:
        raise RecentError(_nothing_text(session.address))
    # `before` skips to the next older one it may see when that number is not among them.
    if found is None or (number and found.number != number):
        raise NoSuchResult(
            f"the daemon at {session.address} lists no result {number} for this user "
            "(it lists its last 500 saved images; 0 is the newest)"
        )
    if found.image is None:
        if found.path is None:
            raise RecentError(f"result {found.number} was never saved to a file by the daemon")
        raise RecentError(f"the file of result {found.number} was moved or deleted: {found.path}")
    return found


def details(result: SavedResult) -> str:
    """The line under a result's label: its number (the one to ask for), model and time."""
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(result.created))
    return f"#{result.number} · {result.model} · {when}"


def _nothing_text(address: str) -> str:
    return (
        f"the daemon at {address} has no results to show: it lists the last 500 images it "
        "saved, and a daemon with a token only what this user's editors made"
    )


def _results(session: Session, before: int | None, limit: int, images: bool = False) -> ResultsPage:
    try:
        return session.results(before, limit, images)
    except ClientError as exc:
        if exc.code == ErrorCode.UNKNOWN_OP:
            raise RecentError(
                f"the daemon at {session.address} cannot list its results (its sdbridge is "
                "older than this editor's); update it and restart `sdbridge serve`"
            ) from exc
        raise RecentError(exc.message) from exc  # it names the address and what to do
