"""`results`: a client that lost its connection, or an editor restarted since, gets its pictures
back from the daemon, and only its own when the daemon has a token."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from helpers import DaemonProcess, Peer, TcpProxy, pixels, wait_until
from PIL import Image

from sdbridge.daemon.parameters import GenerationInfo
from sdbridge.daemon.results import ResultsLog
from sdbridge.editor.config import session_key
from sdbridge.editor.session import Phase, Session
from sdbridge.wire import protocol
from sdbridge.wire.client import Client, Link, new_session_key

JOB = {"prompt": "a red circle on a blue background", "num_inference_steps": 4, "seed": 7}
TOKEN = "results-token-for-the-tests-0123456789"


@pytest.fixture(scope="module")
def guarded(pipeline_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """A daemon with a token: a connection sees only its own results and its session's."""
    workdir = tmp_path_factory.mktemp("guarded-results")
    process = DaemonProcess(pipeline_dir, workdir, token=TOKEN).start()
    yield process
    process.stop()


def listed(peer: Peer, **query: object) -> list[dict]:
    answer = peer.answer("results", **query)
    assert answer["event"] == "results", answer
    return answer["results"]


def decoded(image: dict) -> np.ndarray:
    assert image["format"] == "png"
    return np.asarray(Image.open(io.BytesIO(image["data"])).convert("RGB"))


def test_results_lists_saved_images_newest_first_with_thumbnails_and_metadata(peer) -> None:
    first = peer.generate(**JOB, width=96, height=64, num_images=2)[-1]
    second = peer.generate(**{**JOB, "prompt": "a blue square", "seed": 8})[-1]
    newest = listed(peer, limit=3)
    assert [(r["job"], r["index"]) for r in newest] == [
        (second["id"], 0),
        (first["id"], 1),
        (first["id"], 0),
    ]
    assert newest[0]["number"] > newest[1]["number"] > newest[2]["number"]
    entry = newest[2]
    assert entry["prompt"] == JOB["prompt"] and entry["seed"] == 7 and entry["model"] == "tiny-sd"
    assert (entry["width"], entry["height"]) == (96, 64)
    assert entry["parameters"] == first["images"][0]["parameters"]
    assert entry["path"] == first["images"][0]["path"] and Path(entry["path"]).exists()
    assert entry["image"] is None  # not asked for
    thumb = entry["thumbnail"]
    assert (thumb["width"], thumb["height"]) == (96, 64)  # smaller than 128: as it is
    assert decoded(thumb).shape == (64, 96, 3)
    assert newest[1]["seed"] == 8  # the second image: seed + 1


def test_the_image_comes_from_the_saved_file_and_equals_the_result(peer) -> None:
    done = peer.generate(**JOB, width=64, height=64)[-1]
    (entry,) = listed(peer, limit=1, images=True)  # the shared daemon's newest: this one
    assert entry["path"] == done["images"][0]["path"]
    # The file as it was when read: stored at first, compressed once the result is out.
    assert entry["image"]["data"][:8] == b"\x89PNG\r\n\x1a\n"
    sent = pixels(done["images"][0])[..., :3]
    assert np.array_equal(decoded(entry["image"]), sent)


def test_paging_back_with_before_reaches_every_result_once(peer) -> None:
    done = [peer.generate(**{**JOB, "seed": seed}, width=32, height=32)[-1] for seed in range(5)]
    paths = [job["images"][0]["path"] for job in done]
    seen: list[str] = []
    before = None
    while True:
        page = peer.answer("results", limit=2, **({"before": before} if before else {}))
        seen += [r["path"] for r in page["results"]]
        assert len(page["results"]) <= 2
        if not page["more"]:
            break
        before = page["results"][-1]["number"]
    assert [path for path in seen if path in paths] == paths[::-1]
    assert len(seen) == len(set(seen))


def test_a_missing_file_leaves_the_entry_without_its_image(peer) -> None:
    done = peer.generate(**JOB, width=32, height=32)[-1]
    path = Path(done["images"][0]["path"])
    wait_until(lambda: path.read_bytes()[25] == 2)  # compressed (RGB): the daemon is done with it
    path.unlink()
    (entry,) = listed(peer, limit=1, images=True)
    assert entry["path"] == done["images"][0]["path"]
    assert entry["image"] is None and entry["thumbnail"]["data"]


@pytest.mark.parametrize(
    ("fields", "code", "field"),
    [
        ({"limit": 0}, "out_of_range", "limit"),
        ({"limit": 51}, "out_of_range", "limit"),
        ({"limit": "5"}, "bad_type", "limit"),
        ({"before": 0}, "out_of_range", "before"),
        ({"images": 1}, "bad_type", "images"),
        ({"page": 2}, "unknown_field", "page"),
    ],
)
def test_a_bad_results_request_is_refused_naming_the_field(peer, fields, code, field) -> None:
    answer = peer.answer("results", **fields)
    assert (answer["event"], answer["code"], answer["field"]) == ("error", code, field)


@pytest.mark.parametrize("session", ["short", "x" * 129, 42])
def test_a_bad_session_key_is_refused(peer, session) -> None:
    answer = peer.answer("hello", session=session)
    assert answer["event"] == "error" and answer["field"] == "session"


def test_with_a_token_each_connection_sees_its_own_and_its_sessions_results(guarded) -> None:
    key = new_session_key()
    owner = Peer(guarded.address, token=TOKEN)
    stranger = Peer(guarded.address, token=TOKEN)
    try:
        assert owner.answer("hello", session=key)["event"] == "hello"
        job = owner.generate(**JOB, width=32, height=32)[-1]["id"]
        assert [r["job"] for r in listed(owner)] == [job]
        assert listed(stranger) == []
        assert stranger.answer("hello", session=new_session_key())["event"] == "hello"
        assert listed(stranger) == []
    finally:
        owner.close()
        stranger.close()
    again = Peer(guarded.address, token=TOKEN)
    try:
        assert listed(again) == []  # a new connection without the key: nothing
        again.answer("hello", session=key)
        assert [r["job"] for r in listed(again)] == [job]
    finally:
        again.close()


def test_a_job_whose_client_vanished_is_found_again_by_its_session(guarded) -> None:
    """The client goes mid-job; the daemon finishes and saves it; the same key gets it back."""
    key = new_session_key()
    gone = Client(guarded.address, token=TOKEN, session=key)
    job = gone.generate(**{**JOB, "num_inference_steps": 30}, width=64, height=64)
    for event in job.events(timeout=60):
        if event["event"] == "progress":
            break
    gone.close()
    with Session(guarded.address, TOKEN, session_key=key) as session:
        wait_until(lambda: any(r.job == job.id for r in session.results().results), timeout=60)
        (found,) = [r for r in session.results(images=True).results if r.job == job.id]
    assert found.image is not None and found.seed == JOB["seed"]
    assert (found.width, found.height) == (64, 64)
    with Session(guarded.address, TOKEN, session_key=new_session_key()) as other:
        assert other.results().results == ()


def test_the_artists_session_key_is_kept_private_and_stable(tmp_path: Path) -> None:
    path = tmp_path / "sdbridge" / "session-key"
    key = session_key(path)
    assert session_key(path) == key and len(key) == 32
    assert path.stat().st_mode & 0o777 == 0o600
    path.write_text("damaged")
    repaired = session_key(path)
    assert repaired != key and session_key(path) == repaired


def test_hello_lists_the_new_capabilities(peer) -> None:
    assert {"results", "live"} <= set(peer.answer("hello")["capabilities"])
    assert protocol.MAX_RESULTS_PAGE == 50


def test_a_client_asking_for_more_than_it_reads_is_told_to_wait(daemon_factory) -> None:
    """Answers to a client that never reads would pile up in the daemon: each address gets two
    largest messages' worth of `results`, refilled over RESULTS_REFILL_S."""
    small = daemon_factory("--max-message-bytes", "60000")
    peer = Peer(small.address)
    try:
        peer.generate(**JOB, width=128, height=128, num_images=2, output_format="png")
        first = peer.answer("results", images=True)
        assert first["event"] == "results" and first["results"][0]["image"] is not None
        refused = [peer.answer("results", images=True) for _ in range(3)]
        busy = [answer for answer in refused if answer["event"] == "error"]
        assert busy and all(answer["code"] == "busy" for answer in busy)
        assert "ask again in" in busy[0]["message"]
        wait_until(lambda: peer.answer("results", limit=1)["event"] == "results", timeout=30)
    finally:
        peer.close()


def test_a_session_cut_off_mid_job_finds_the_image_after_it_reconnects(guarded) -> None:
    """The network drops mid-job; the client reconnects by itself and presents its session key
    again, so on a daemon with a token the new connection sees the old one's result."""
    with TcpProxy(guarded.address) as proxy:
        session = Session(proxy.address, TOKEN, session_key=new_session_key())
        try:
            generation = session.submit({**JOB, "num_inference_steps": 30, "width": 64})
            views = generation.views(timeout=60)
            next(view for view in views if view.phase is Phase.RUNNING and view.step)
            proxy.cut()
            assert [view.phase for view in views][-1] is Phase.FAILED  # connection_lost
            assert generation.job is not None
            job = generation.job.id
            wait_until(lambda: session.link is Link.CONNECTED, timeout=10)
            wait_until(lambda: any(r.job == job for r in session.results().results), timeout=60)
        finally:
            session.close()


def test_results_outlive_a_daemon_restart_for_their_owner_only(daemon_factory) -> None:
    """The daemon notes each saved image in an index in its output folder and reads the last
    ones back when it starts: an editor and a daemon both restarted still list yesterday's."""
    process = daemon_factory(token=TOKEN)
    key = new_session_key()
    with Session(process.address, TOKEN, session_key=key) as session:
        first = session.submit({**JOB, "width": 48, "height": 32})
        before = next(view for view in first.views(timeout=60) if view.done).result
    assert before is not None
    process.restart()
    with Session(process.address, TOKEN, session_key=key) as session:
        page = session.results(images=True)
        (earlier,) = page.results
        assert (earlier.prompt, earlier.seed, earlier.width, earlier.height) == (
            JOB["prompt"], JOB["seed"], 48, 32,
        )  # fmt: skip
        assert earlier.path == before.images[0].path
        assert earlier.parameters == before.images[0].parameters
        assert earlier.image is not None and earlier.thumbnail["data"]
        assert np.array_equal(decoded(earlier.image), pixels(dict(before.images[0].image))[..., :3])
        later = session.submit({**JOB, "seed": 9, "width": 32, "height": 32})
        assert next(view for view in later.views(timeout=60) if view.done).result
        numbers = [r.number for r in session.results().results]
        assert len(numbers) == 2 and numbers[0] > numbers[1] == earlier.number  # counts on
    with Session(process.address, TOKEN, session_key=new_session_key()) as stranger:
        assert stranger.results().results == ()


def test_a_damaged_index_costs_only_its_damaged_lines(daemon_factory, tmp_path: Path) -> None:
    process = daemon_factory()
    peer = Peer(process.address)
    kept = peer.generate(**JOB, width=32, height=32)[-1]["images"][0]["path"]
    gone = peer.generate(**{**JOB, "seed": 8}, width=32, height=32)[-1]["images"][0]["path"]
    peer.close()
    process.stop()
    Path(gone).unlink()
    outside = tmp_path / "outside.png"
    Image.new("RGB", (32, 32)).save(outside)
    index = process.output_dir / ".sdbridge-results.jsonl"
    good = index.read_text().splitlines()[0]
    foreign = good.replace(Path(kept).relative_to(process.output_dir).as_posix(), "../outside.png")
    with index.open("a") as out:
        out.write("not json\n" + foreign + '\n{"number": 99, "path": 5}\n{"number": 100, "pa')
    process.start()
    peer = Peer(process.address)
    try:
        assert [r["path"] for r in listed(peer)] == [kept]
        fresh = peer.generate(**{**JOB, "seed": 10}, width=32, height=32)[-1]["images"][0]
        assert listed(peer)[0]["number"] == 100  # after the highest readable number: 99
    finally:
        peer.close()
    process.restart()
    peer = Peer(process.address)
    try:  # the line cut short by a "crash" did not swallow the next one
        assert [r["path"] for r in listed(peer)] == [fresh["path"], kept]
    finally:
        peer.close()


def test_the_index_is_cut_back_to_what_is_listed(tmp_path: Path) -> None:
    image = Image.new("RGB", (16, 16), (200, 30, 30))
    log = ResultsLog(tmp_path, capacity=3)
    log.restore()  # nothing earlier: from here on the log may cut its index back
    for seed in range(7):
        path = tmp_path / f"{seed:05d}-{seed}.png"
        image.save(path)
        info = GenerationInfo("a red square", "", 1, "Euler", 0.0, seed, 16, 16, "tiny")
        log.add("j", 0, image, info, path, connection=1, owner=None)
    # Cut back to the three listed once past six lines, while it runs.
    assert len((tmp_path / ".sdbridge-results.jsonl").read_text().splitlines()) == 3
    index = tmp_path / ".sdbridge-results.jsonl"
    index.write_text(index.read_text() * 3)  # as an older daemon left it: 9 lines
    again = ResultsLog(tmp_path, capacity=3)  # a restart: over twice the capacity, cut back
    assert len((tmp_path / ".sdbridge-results.jsonl").read_text().splitlines()) == 3
    again.restore()
    page = again.page(protocol.ResultsQuery(), lambda record: True, lambda record: False)
    assert [entry["seed"] for entry in page["results"]] == [6, 5, 4]


def test_on_a_daemon_without_a_token_a_client_tells_its_own_results_by_mine(daemon) -> None:
    key = new_session_key()
    with Session(daemon.address, session_key=key) as mine:
        made = mine.submit({**JOB, "width": 32, "height": 32})
        job = next(view for view in made.views(timeout=60) if view.done).result
    assert job is not None
    path = job.images[0].path
    with Session(daemon.address, session_key=key) as again, Session(daemon.address) as other:
        (own,) = [r for r in again.results().results if r.path == path]
        (theirs,) = [r for r in other.results().results if r.path == path]
    assert own.mine and not theirs.mine


def test_a_file_name_used_again_lists_only_the_newer_image(tmp_path: Path) -> None:
    """Deleting the newest file frees its number: the next image of that seed takes the
    name, and the entry of the deleted one must not show the newer picture."""
    log = ResultsLog(tmp_path)
    path = tmp_path / "00001-7.png"
    for prompt, colour in (("first", (200, 0, 0)), ("second", (0, 0, 200))):
        image = Image.new("RGB", (16, 16), colour)
        image.save(path)
        info = GenerationInfo(prompt, "", 1, "Euler", 0.0, 7, 16, 16, "tiny")
        log.add("j", 0, image, info, path, connection=1, owner=None)
    log.restore()
    page = log.page(protocol.ResultsQuery(), lambda record: True, lambda record: False)
    assert [entry["prompt"] for entry in page["results"]] == ["second"]
    again = ResultsLog(tmp_path)  # after a restart too
    again.restore()
    page = again.page(protocol.ResultsQuery(), lambda record: True, lambda record: False)
    assert [entry["prompt"] for entry in page["results"]] == ["second"]
