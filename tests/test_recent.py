"""sdbridge.editor.recent: an editor's "Recent results" picks one of the daemon's saved
results and gets its picture, or a sentence saying why there is none."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from helpers import OldDaemon, pixels, wait_until
from PIL import Image

from sdbridge.editor.recent import (
    NoSuchResult,
    RecentError,
    details,
    fetch_result,
    list_results,
)
from sdbridge.editor.session import Session
from sdbridge.wire.client import Client, new_session_key

JOB = {"prompt": "a red circle on a blue background", "num_inference_steps": 2}
TOKEN = "recent-token-for-the-tests-0123456789"


def decoded(image: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(image["data"])).convert("RGBA"))


def test_the_newest_or_a_numbered_result_comes_with_its_own_picture(daemon) -> None:
    with Client(daemon.address) as client:
        older = client.generate(**JOB, seed=1, width=48, height=32).result(60)
        newer = client.generate(**JOB, seed=2, width=32, height=32).result(60)
    with Session(daemon.address) as session:
        newest = fetch_result(session)
        below = list_results(session, before=newest.number, limit=1).results[0]
        numbered = fetch_result(session, below.number)
    assert (newest.seed, numbered.seed) == (2, 1)
    assert newest.path == newer["images"][0]["path"]
    assert np.array_equal(decoded(newest.image), pixels(newer["images"][0]))
    assert np.array_equal(decoded(numbered.image), pixels(older["images"][0]))
    # The list's line names the number a script asks for.
    assert details(numbered).startswith(f"#{numbered.number} · tiny-sd · ")


def test_a_list_pages_back_from_the_newest_with_thumbnails_only(daemon) -> None:
    with Client(daemon.address) as client:
        for seed in (3, 4):
            client.generate(**JOB, seed=seed, width=32, height=32).result(60)
    with Session(daemon.address) as session:
        first = list_results(session, limit=1)
        second = list_results(session, before=first.results[0].number, limit=1)
    assert first.more and [r.seed for r in (*first.results, *second.results)] == [4, 3]
    assert all(r.image is None and r.thumbnail["data"] for r in first.results)


def test_a_number_the_daemon_does_not_list_is_the_callers_mistake(daemon) -> None:
    with Client(daemon.address) as client:
        client.generate(**JOB, seed=5, width=32, height=32).result(60)
    with Session(daemon.address) as session:
        newest = fetch_result(session).number
        with pytest.raises(NoSuchResult, match=f"lists no result {newest + 1} for this user"):
            fetch_result(session, newest + 1)


def test_a_result_whose_file_is_gone_names_the_file(daemon) -> None:
    with Client(daemon.address) as client:
        done = client.generate(**JOB, seed=6, width=32, height=32).result(60)
    path = Path(done["images"][0]["path"])
    wait_until(lambda: path.read_bytes()[25] == 2)  # compressed (RGB): the daemon is done with it
    path.unlink()
    with Session(daemon.address) as session:
        number = list_results(session, limit=1).results[0].number
        with pytest.raises(RecentError) as raised:
            fetch_result(session, number)
    assert str(raised.value) == f"the file of result {number} was moved or deleted: {path}"


def test_with_a_token_another_keys_results_are_not_shown(daemon_factory) -> None:
    guarded = daemon_factory(token=TOKEN)
    with Client(guarded.address, token=TOKEN, session=new_session_key()) as stranger:
        stranger.generate(**JOB, seed=7, width=32, height=32).result(60)
    with Session(guarded.address, TOKEN, session_key=new_session_key()) as session:
        for attempt in (list_results, fetch_result):
            with pytest.raises(RecentError, match="has no results to show") as raised:
                attempt(session)
            assert "only what this user's editors made" in str(raised.value)


def test_a_daemon_from_before_results_says_to_update() -> None:
    with (
        OldDaemon() as old,
        Session(old.address) as session,
        pytest.raises(RecentError, match="cannot list its results") as raised,
    ):
        list_results(session)
    assert "update it and restart `sdbridge serve`" in str(raised.value)
    assert not isinstance(raised.value, NoSuchResult)
