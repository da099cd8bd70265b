"""Limits: derived from the memory a job can use, set in the config file or by flags, reported by
hello, enforced with errors that say which limit, at the ZeroMQ layer for the message size, and
per connection and in total for the queue."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import DaemonProcess, Peer, ask, raw_image, sdbridge

from sdbridge.daemon.images import job_memory_bytes
from sdbridge.wire import protocol
from sdbridge.wire.protocol import Limits

GIB = 2**30

LIMITS = {
    "max_message_bytes": 100_000,
    "max_side": 64,
    "max_pixels": 2048,
    "max_steps": 100,
    "max_images": 1,
    "max_prompt_chars": 10,
    "max_queue": 2,
    "max_queue_per_client": 2,
    "max_connections": 16,
}
LONG = {"prompt": "slow", "num_inference_steps": 100, "width": 8, "height": 8}
PORTRAIT = raw_image(np.zeros((64, 32, 3), np.uint8))  # 2048 pixels, max_pixels exactly


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


def test_a_daemon_without_limit_settings_sizes_images_for_its_devices_memory(daemon) -> None:
    hello = ask(daemon.address, {"v": 1, "op": "hello", "id": "h"})
    expected = Limits.for_memory(job_memory_bytes(torch.device("cpu")))
    assert hello["limits"] == expected.to_dict()
    assert expected.max_pixels < expected.max_side**2  # on this machine's RAM (24 GiB)


@pytest.mark.parametrize(
    ("fields", "field", "words"),
    [
        ({"num_inference_steps": 101}, "num_inference_steps", "1..100"),
        ({"width": 65}, "width", "8..64"),
        ({"width": 64, "height": 64}, "width", "at most 2048 pixels"),
        # A side left out counts as it will be: the init image's, or the model's (64).
        ({"width": 40, "init_image": PORTRAIT}, "width", "40x64 is more (height 64: the init"),
        ({"width": 40}, "width", "40x64 is more (height 64: the model's native size)"),
        ({"height": 40, "exact_size": True}, "height", "64x40 is more (width 64: the model's"),
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


@pytest.mark.parametrize("fmt", ["raw", "png"])
def test_an_image_over_max_pixels_is_refused_naming_its_field(limited: DaemonProcess, fmt) -> None:
    """64x64 is within max_side (64) but over max_pixels (2048), whatever the width asked."""
    image = raw_image(np.zeros((64, 64, 3), np.uint8))
    if fmt == "png":
        image = {**image, "format": "png", "data": protocol.encode_png(64, 64, image["data"])}
    peer = Peer(limited.address)
    try:
        refused = error(peer, prompt="ok", width=32, height=32, init_image=image)
    finally:
        peer.close()
    assert (refused["code"], refused["field"]) == ("bad_image", "init_image")
    assert "64x64 is more than 2048 pixels (limits.max_pixels)" in refused["message"]


def test_the_default_limits_bite_and_a_message_holds_two_images_at_max_pixels() -> None:
    limits = Limits()
    assert limits.max_pixels < limits.max_side**2
    assert limits.max_message_bytes == 2 * 4 * limits.max_pixels + 2**20
    assert limits == Limits.for_memory(32 * GIB)


@pytest.mark.parametrize(
    ("memory", "max_pixels"),
    [
        (8 * GIB, 1024 * 1024),  # half of it at 4 KiB a pixel
        (24 * GIB, 3 * 1024 * 1024),
        (1 * GIB, 512 * 512),  # the floor: nothing smaller is of use
        (141 * GIB, 4096 * 4096),  # never beyond max_side squared
    ],
)
def test_max_pixels_and_the_message_size_follow_from_memory(memory: int, max_pixels: int) -> None:
    limits = Limits.for_memory(memory)
    assert limits.max_pixels == max_pixels
    assert limits.max_message_bytes == 2 * 4 * max_pixels + 2**20
    assert limits.max_side == Limits().max_side and limits.max_queue == Limits().max_queue


def test_the_operators_limits_win_and_the_message_size_follows_a_given_max_pixels() -> None:
    assert Limits.for_memory(8 * GIB, max_side=512).max_pixels == 512 * 512
    given = Limits.for_memory(8 * GIB, max_pixels=100_000, max_queue=3)
    assert (given.max_pixels, given.max_queue) == (100_000, 3)
    assert given.max_message_bytes == 2 * 4 * 100_000 + 2**20
    assert Limits.for_memory(8 * GIB, max_message_bytes=5000).max_message_bytes == 5000


def test_the_largest_request_fits_max_message_bytes() -> None:
    """Init and mask image at max_pixels, as raw or as PNGs of noise (which PNG cannot shrink),
    the longest prompts of 4-byte characters and every other field: a client never hits the
    ZeroMQ cap with a request the limits allow."""
    limits = Limits.for_memory(1 * GIB)
    side = int(limits.max_pixels**0.5)
    rng = np.random.default_rng(0)
    raw = raw_image(rng.integers(0, 256, (side, side, 4), np.uint8))
    png = {**raw, "format": "png", "data": protocol.encode_png(side, side, raw["data"])}
    for image in (raw, png):
        message = {
            "v": 1,
            "op": "generate",
            "id": "x" * protocol.MAX_ID_CHARS,
            "prompt": "\U0001f600" * limits.max_prompt_chars,
            "negative_prompt": "\U0001f600" * limits.max_prompt_chars,
            "loras": [{"name": "\U0001f600" * protocol.MAX_NAME_CHARS, "weight": 1.0}]
            * protocol.MAX_LORAS,
            "model": "\U0001f600" * protocol.MAX_NAME_CHARS,
            "scheduler": "\U0001f600" * protocol.MAX_NAME_CHARS,
            "init_image": image,
            "mask_image": image,
        }
        assert len(protocol.pack(message)) <= limits.max_message_bytes


def test_a_job_on_a_cpu_runs_in_the_machines_ram() -> None:
    meminfo = Path("/proc/meminfo").read_text().splitlines()
    total_kib = int(next(line for line in meminfo if line.startswith("MemTotal:")).split()[1])
    assert job_memory_bytes(torch.device("cpu")) == total_kib * 1024


def test_the_queue_is_bounded_per_client_address_and_in_total(limited: DaemonProcess) -> None:
    # Bob connects from another loopback address: the per-client limit is per address.
    alice = Peer(limited.address)
    bob = Peer(limited.address.replace("tcp://", "tcp://127.0.0.2:0;"))
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


def test_a_model_loaded_for_the_job_is_checked_at_its_own_native_size(
    library: Path, daemon_factory
) -> None:
    """Not resident when the job comes, the model's native size (64) is known once it loads."""
    daemon = daemon_factory("--models-dir", str(library / "models"), "--max-pixels", "2048")
    peer = Peer(daemon.address)
    try:
        events = peer.generate(prompt="ok", model="tiny-sd-turbo", width=40)
    finally:
        peer.close()
    assert events[0]["event"] == "accepted"
    refused = events[-1]
    assert refused["event"] == "error", refused
    assert (refused["code"], refused["field"]) == ("out_of_range", "width")
    assert "40x64 is more (height 64: the model's native size)" in refused["message"]
