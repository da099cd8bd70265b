"""Live painting on the wire: each connection has one live slot, and the newest live job takes it.

A stroke's job that a newer stroke overtakes is dropped if it has not started and stopped at
its next step if it has, so the daemon only ever paints the latest canvas; every job still ends
with exactly one terminal event.
"""

from __future__ import annotations

import numpy as np
from helpers import Peer, raw_image, wait_until

from sdbridge.wire import protocol

CANVAS = raw_image(np.tile(np.linspace(0, 255, 64, dtype=np.uint8), (64, 1)))
LIVE = {
    "prompt": "a red circle on a blue background",
    "init_image": CANVAS,
    "strength": 0.5,
    "seed": 3,
    "live": True,
}


def terminals(peer: Peer, ids: list[str]) -> dict[str, dict]:
    """Reads until every job in `ids` has ended; fails on a second terminal event for one."""
    ended: dict[str, dict] = {}
    while len(ended) < len(ids):
        event = peer.receive()
        if event["id"] in ids and event["event"] in protocol.TERMINAL_EVENTS:
            assert event["id"] not in ended, f"two terminal events for {event['id']}"
            ended[event["id"]] = event
    assert peer.silent(0.5) or all(e["id"] not in ids for e in peer.drain())
    return ended


def test_a_newer_live_job_drops_the_queued_one(daemon) -> None:
    busy, painter = Peer(daemon.address), Peer(daemon.address)
    try:
        # Another connection's long job holds the worker, so the live jobs wait in the queue.
        long = busy.send("generate", prompt="a long job", num_inference_steps=60)
        wait_until(lambda: any(e["event"] == "started" for e in busy.drain(50)), timeout=30)
        first = painter.send("generate", **LIVE)
        second = painter.send("generate", **{**LIVE, "strength": 0.6})
        events = [painter.receive() for _ in range(3)]
        assert [(e["id"], e["event"]) for e in events] == [
            (first, "accepted"),
            (first, "cancelled"),
            (second, "accepted"),
        ]
        assert events[1]["reason"] == "superseded"
        assert busy.answer("cancel", job=long)["event"] == "cancel"
        ended = terminals(painter, [second])
        assert ended[second]["event"] == "result"
    finally:
        busy.close()
        painter.close()


def test_a_newer_live_job_stops_the_running_one_at_its_next_step(peer) -> None:
    running = peer.send("generate", **{**LIVE, "num_inference_steps": 150, "strength": 1.0})
    seen = peer.until(running, {"progress", *protocol.TERMINAL_EVENTS})
    assert seen[-1]["event"] == "progress", seen[-1]
    newer = peer.send("generate", **LIVE)
    ended = terminals(peer, [running, newer])
    assert (ended[running]["event"], ended[running]["reason"]) == ("cancelled", "superseded")
    assert ended[newer]["event"] == "result"
    steps = [e["step"] for e in peer.inbox if e["id"] == running and e["event"] == "progress"]
    assert max(steps) < 150 // 2  # stopped long before its end


def test_live_results_are_neither_saved_nor_listed(peer, daemon) -> None:
    peer.generate(prompt="an ordinary job first", num_inference_steps=2, width=32, height=32)
    newest = peer.answer("results", limit=1)["results"]
    before = sorted(daemon.output_dir.rglob("*.png"))
    job = peer.send("generate", **LIVE, output_format="png")
    result = terminals(peer, [job])[job]
    image = result["images"][0]
    assert image["path"] is None and result["warning"] is None
    assert protocol.png_size(image["data"]) == (64, 64)
    assert sorted(daemon.output_dir.rglob("*.png")) == before
    assert peer.answer("results", limit=1)["results"] == newest


def test_a_burst_of_strokes_ends_every_job_once_and_paints_the_last(peer) -> None:
    ids = [peer.send("generate", **{**LIVE, "seed": seed}) for seed in range(12)]
    ended = terminals(peer, ids)
    assert ended[ids[-1]]["event"] == "result"
    earlier = [ended[job] for job in ids[:-1]]
    assert all(e["event"] in ("cancelled", "result") for e in earlier)
    assert all(e["reason"] == "superseded" for e in earlier if e["event"] == "cancelled")
    # Only a job that finished before the next stroke arrived can have a result.
    assert sum(e["event"] == "result" for e in earlier) <= 1


def test_live_and_ordinary_jobs_do_not_supersede_each_other(peer) -> None:
    ordinary = peer.send("generate", prompt="a blue square", num_inference_steps=4)
    live = peer.send("generate", **LIVE)
    other = peer.send("generate", prompt="a green circle", num_inference_steps=4)
    ended = terminals(peer, [ordinary, live, other])
    assert {job: e["event"] for job, e in ended.items()} == dict.fromkeys(
        [ordinary, live, other], "result"
    )


def test_a_refused_live_job_leaves_the_current_one_alone(peer) -> None:
    current = peer.send("generate", **{**LIVE, "num_inference_steps": 30})
    broken = peer.send("generate", **{**LIVE, "init_image": {**CANVAS, "data": b"short"}})
    ended = terminals(peer, [current, broken])
    assert ended[broken]["event"] == "error" and ended[broken]["field"] == "init_image"
    assert ended[current]["event"] == "result"


def test_live_must_be_a_boolean(peer) -> None:
    events = peer.generate(**{**LIVE, "live": 1})
    assert (events[-1]["code"], events[-1]["field"]) == ("bad_type", "live")


def test_each_connection_has_a_live_slot_of_its_own(daemon) -> None:
    left, right = Peer(daemon.address), Peer(daemon.address)
    try:
        mine = left.send("generate", **LIVE)
        theirs = right.send("generate", **LIVE)
        assert terminals(left, [mine])[mine]["event"] == "result"
        assert terminals(right, [theirs])[theirs]["event"] == "result"
    finally:
        left.close()
        right.close()
