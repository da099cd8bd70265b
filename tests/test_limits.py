"""Limits: set in the config file or by flags, reported by hello, enforced with errors that say
which limit, at the ZeroMQ layer for the message size, and per connection and in total for the
queue."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from daemons import DaemonProcess, ask
from test_daemon import Peer
from test_security import sdbridge

LIMITS = {
    "max_message_bytes": 100_000,
    "max_side": 64,
    "max_pixels": 2048,
    "max_steps": 100,
    "max_images": 1,
    "max_prompt_chars": 10,
    "max_queue": 2,
    "max_queue_per_client": 2,
}
LONG = {"prompt": "slow", "num_inference_steps": 100, "width": 8, "height": 8}


@pytest.fixture(scope="module")
def limited(pipeline_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """Limits from a config file, one of them overridden by its flag."""
    workdir = tmp_path_factory.mktemp("limited")
    config = workdir / "config.toml"
    table = {**LIMITS, "max_prompt_chars": 999}
    config.write_text("[limits]\n" + "".join(f"{k} = {v}\n" for k, v in table.items()))
    extra = ("--config", str(config), "--max-prompt-chars", "10")
    process = DaemonProcess(pipeline_dir, workdir, *extra).start()
    yield process
    process.stop()


def error(peer: Peer, **fields: Any) -> dict[str, Any]:
    events = peer.until(peer.send("generate", **fields))
    assert [e["event"] for e in events] == ["error"]
    return events[0]


def test_hello_reports_the_configured_limits(limited: DaemonProcess) -> None:
    hello = ask(limited.address, {"v": 1, "op": "hello", "id": "h"})
    assert hello["limits"] == LIMITS


@pytest.mark.parametrize(
    ("fields", "field", "words"),
    [
        ({"num_inference_steps": 101}, "num_inference_steps", "1..100"),
        ({"width": 65}, "width", "8..64"),
        ({"width": 64, "height": 64}, "width", "at most 2048 pixels"),
        ({"num_images": 2}, "num_images", "1..1"),
        ({"prompt": "eleven char"}, "prompt", "longer than 10 characters"),
        ({"negative_prompt": "x" * 11}, "negative_prompt", "longer than 10 characters"),
    ],
)
def test_each_limit_is_enforced_naming_the_field(
    limited: DaemonProcess, fields: dict[str, Any], field: str, words: str
) -> None:
    peer = Peer(limited.address)
    try:
        refused = error(peer, **{"prompt": "ok", **fields})
    finally:
        peer.close()
    assert (refused["code"], refused["field"]) == ("out_of_range", field)
    assert words in refused["message"]


def test_the_queue_is_bounded_per_connection_and_in_total(limited: DaemonProcess) -> None:
    alice, bob = Peer(limited.address), Peer(limited.address)
    try:
        # 1 running + 1 queued; the first has started, so the total queue holds one job.
        first = alice.send("generate", **LONG)
        alice.until(first, {"started"})
        second, third = alice.send("generate", **LONG), alice.send("generate", **LONG)
        over = alice.until(third)[-1]
        assert over["code"] == "busy" and "max_queue_per_client" in over["message"]
        bob_first = bob.send("generate", **LONG)  # the queue: alice's second, bob's first
        bob.until(bob_first, {"accepted"})
        full = error(bob, **LONG)
        assert full["code"] == "busy" and "the queue is full (2 jobs)" in full["message"]
        for peer, rid in ((alice, first), (alice, second), (bob, bob_first)):
            peer.send("cancel", job=rid)
            assert peer.until(rid)[-1]["event"] == "cancelled"
        assert alice.generate(**{**LONG, "num_inference_steps": 2})[-1]["event"] == "result"
    finally:
        alice.close()
        bob.close()


def test_an_oversized_message_is_dropped_by_zeromq_and_the_daemon_serves_on(
    limited: DaemonProcess,
) -> None:
    peer = Peer(limited.address)
    try:
        big = {"width": 200, "height": 200, "format": "raw", "data": bytes(200 * 200 * 4)}
        peer.send("generate", prompt="big", init_image=big)
        assert not peer.socket.poll(1000)  # libzmq closed that connection; nothing came back
    finally:
        peer.close()
    assert ask(limited.address, {"v": 1, "op": "status", "id": "s"})["event"] == "status"


def test_a_bad_limit_is_refused_at_start() -> None:
    run = sdbridge("serve", "--max-queue", "0", "--model", "x", env={})
    assert run.returncode == 2 and "max_queue must be a positive integer" in run.stderr
