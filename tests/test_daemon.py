"""The daemon as any ZeroMQ client sees it (libzmq DEALER sockets through pyzmq)."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import Peer, pixels, raw_image, result_image
from PIL import Image

from sdbridge.wire import protocol

JOB = {"prompt": "a red circle on a blue background", "num_inference_steps": 8, "seed": 42}


def test_hello_reports_device_model_and_limits(peer) -> None:
    hello = peer.answer("hello", client="test")
    assert hello["event"] == "hello"
    assert hello["protocol"] == [1]
    assert hello["device"] == "cpu" and hello["dtype"] == "float32"
    assert hello["model"] == "tiny-sd" and "tiny-sd" in hello["models"]
    assert {"txt2img", "img2img", "inpaint", "preview", "cancel"} <= set(hello["capabilities"])
    assert hello["limits"]["max_steps"] == protocol.Limits().max_steps


def test_a_job_streams_accepted_started_progress_and_result(peer) -> None:
    events = peer.generate(**JOB, width=64, height=64)
    kinds = [e["event"] for e in events]
    assert kinds == ["accepted", "started"] + ["progress"] * 8 + ["result"]
    assert [e["step"] for e in events if e["event"] == "progress"] == list(range(1, 9))
    assert all(e["total"] == 8 for e in events if e["event"] == "progress")
    image = events[-1]["images"][0]
    assert (image["width"], image["height"], image["seed"]) == (64, 64, 42)
    assert pixels(image)[..., :3].std() > 0  # a real picture, not a flat fill


def test_same_seed_same_pixels_other_seed_other_pixels(peer) -> None:
    first = result_image(peer.generate(**JOB))
    again = result_image(peer.generate(**JOB))
    other = result_image(peer.generate(**{**JOB, "seed": 43}))
    assert np.array_equal(first, again)
    assert np.abs(first - other).mean() > 1.0


def test_batch_uses_consecutive_seeds_that_match_single_jobs(peer) -> None:
    batch = peer.generate(**JOB, num_images=2)
    assert [image["seed"] for image in batch[-1]["images"]] == [42, 43]
    single = result_image(peer.generate(**{**JOB, "seed": 43}))
    assert np.abs(result_image(batch, 1) - single).max() <= 2


def test_any_canvas_size_comes_back_at_exactly_that_size(peer) -> None:
    for width, height in [(100, 60), (300, 200), (8, 8)]:
        image = peer.generate(**JOB, width=width, height=height)[-1]["images"][0]
        assert (image["width"], image["height"]) == (width, height)


def test_img2img_low_strength_stays_closer_to_the_init_image(peer) -> None:
    y, x = np.mgrid[0:64, 0:64]
    init = np.stack([x * 4, y * 4, np.full_like(x, 128)], axis=2).astype(np.uint8)
    distances = []
    for strength in (0.2, 0.9):
        events = peer.generate(**JOB, init_image=raw_image(init), strength=strength)
        distances.append(np.abs(result_image(events)[..., :3] - init).mean())
    assert distances[0] < distances[1]


def test_inpainting_keeps_every_pixel_outside_the_mask(peer) -> None:
    init = np.zeros((64, 96, 3), np.uint8)
    init[..., 0], init[..., 1] = 200, np.arange(96, dtype=np.uint8)[None, :]
    mask = np.zeros((64, 96), np.uint8)
    mask[16:48, 24:72] = 255
    events = peer.generate(**JOB, init_image=raw_image(init), mask_image=raw_image(mask))
    result = result_image(events)[..., :3]
    outside = mask == 0
    assert np.array_equal(result[outside], init[outside])
    assert np.abs(result[mask == 255] - init[mask == 255]).mean() > 5


def test_previews_arrive_every_n_steps_as_small_raw_images(peer) -> None:
    events = peer.generate(**JOB, width=64, height=64, preview_every=2)
    previews = [e for e in events if e["event"] == "preview"]
    assert [p["step"] for p in previews] == [2, 4, 6, 8]
    assert (previews[0]["image"]["width"], previews[0]["image"]["height"]) == (8, 8)
    assert len(previews[0]["image"]["data"]) == 8 * 8 * 4


def test_png_output_carries_a1111_parameters(peer) -> None:
    events = peer.generate(**JOB, negative_prompt="blurry", output_format="png")
    image = events[-1]["images"][0]
    assert image["format"] == "png" and image["data"].startswith(b"\x89PNG")
    saved = Path(image["path"])
    assert saved.read_bytes() == image["data"]
    with Image.open(saved) as png:
        parameters = png.text["parameters"]
    assert parameters == events[-1]["parameters"]
    assert parameters.startswith("a red circle on a blue background\nNegative prompt: blurry\n")
    for part in ("Steps: 8", "Sampler: Euler", "CFG scale: 7.5", "Seed: 42", "Size: 64x64"):
        assert part in parameters
    assert "Model: tiny-sd" in parameters


def test_cancel_a_running_job_then_the_next_job_runs(peer) -> None:
    rid = peer.send("generate", **{**JOB, "num_inference_steps": 150})
    peer.until(rid, {"progress"})
    cancel = peer.send("cancel", job=rid)
    # The answer comes at once; the job stops at its next step.
    assert peer.until(cancel, {"cancel"})[-1]["state"] == "running"
    events = peer.until(rid)
    assert (events[-1]["event"], events[-1]["reason"]) == ("cancelled", "client")
    assert peer.generate(**JOB)[-1]["event"] == "result"


def test_cancel_a_queued_job(peer) -> None:
    long_job = peer.send("generate", **{**JOB, "num_inference_steps": 60})
    queued = peer.send("generate", **JOB)
    peer.until(queued, {"accepted"})
    cancel = peer.send("cancel", job=queued)
    assert peer.until(cancel, {"cancel"})[-1] == {
        "v": 1,
        "event": "cancel",
        "id": cancel,
        "job": queued,
        "state": "queued",
    }
    assert peer.until(queued)[-1]["event"] == "cancelled"
    assert peer.until(long_job)[-1]["event"] == "result"


def test_cancel_of_an_unknown_job_is_an_error_for_the_cancel_request(peer) -> None:
    answer = peer.answer("cancel", job="never-sent")
    assert (answer["event"], answer["code"], answer["field"]) == ("error", "unknown_job", "job")


def test_two_clients_each_see_only_their_own_events(daemon) -> None:
    alice, bob = Peer(daemon.address), Peer(daemon.address)
    try:
        a = alice.send("generate", **JOB, id="same-id")
        b = bob.send("generate", **{**JOB, "seed": 7}, id="same-id")
        a_events, b_events = alice.until(a), bob.until(b)
        assert a_events[-1]["images"][0]["seed"] == 42
        assert b_events[-1]["images"][0]["seed"] == 7
        time.sleep(0.2)
        assert not alice.socket.poll(0) and not bob.socket.poll(0)
        assert len(alice.inbox) == len(a_events) and len(bob.inbox) == len(b_events)
    finally:
        alice.close()
        bob.close()


@pytest.mark.parametrize(
    ("fields", "code", "field"),
    [
        ({"prompt": 5}, "bad_type", "prompt"),
        ({}, "missing_field", "prompt"),
        ({"prompt": "x", "steps": 20}, "unknown_field", "steps"),
        ({"prompt": "x", "num_inference_steps": 0}, "out_of_range", "num_inference_steps"),
        ({"prompt": "x", "num_inference_steps": 10**9}, "out_of_range", "num_inference_steps"),
        ({"prompt": "x", "guidance_scale": float("nan")}, "out_of_range", "guidance_scale"),
        ({"prompt": "x", "seed": -1}, "out_of_range", "seed"),
        ({"prompt": "x", "width": 100000, "height": 64}, "out_of_range", "width"),
        ({"prompt": "x", "strength": 0.5}, "missing_field", "init_image"),
        ({"prompt": "x", "model": "../../etc/passwd"}, "unknown_model", "model"),
        ({"prompt": "x", "num_images": True}, "bad_type", "num_images"),
        (
            {"prompt": "x", "init_image": {"width": 2, "height": 2, "data": b"abc"}},
            "bad_image",
            "init_image",
        ),
    ],
)
def test_bad_fields_get_an_error_naming_the_field(peer, fields, code, field) -> None:
    answer = peer.until(peer.send("generate", **fields))
    assert [e["event"] for e in answer] == ["error"]
    assert (answer[0]["code"], answer[0]["field"]) == (code, field)
    assert answer[0]["message"]


def test_malformed_messages_get_errors_and_the_daemon_keeps_serving(peer) -> None:
    peer.send_raw(b"\xc1 not msgpack")
    assert peer.receive()["code"] == "bad_message"
    peer.send_raw(protocol.pack([1, 2, 3]))
    assert peer.receive()["code"] == "bad_message"
    peer.send_raw(protocol.pack({"v": 1, "op": "hello", "id": "two"}), b"extra frame")
    assert peer.receive()["code"] == "bad_message"
    peer.send_raw(protocol.pack({"v": 2, "op": "hello", "id": "v2"}))
    assert (peer.receive()["code"], peer.inbox[-1]["id"]) == ("unsupported_version", "v2")
    peer.send_raw(protocol.pack({"v": 1, "op": "paint", "id": "op"}))
    assert peer.receive()["code"] == "unknown_op"
    peer.send_raw(protocol.pack({"v": 1, "op": "status"}))
    assert peer.receive()["code"] == "missing_field"
    assert peer.generate(**JOB)[-1]["event"] == "result"


def test_duplicate_live_id_is_refused_without_ending_the_live_job(peer) -> None:
    first = peer.send("generate", **{**JOB, "num_inference_steps": 40}, id="dup")
    peer.until(first, {"accepted"})
    peer.send("generate", **JOB, id="dup")
    # Under the id "dup" a client keyed by id would take the error for the live job's end.
    error = peer.until(None, {"error"})[-1]
    assert (error["code"], error["field"]) == ("duplicate_id", "id")
    events = peer.until("dup")
    assert [event["event"] for event in events if event["event"] == "error"] == []
    assert events[-1]["event"] == "result"


def test_status_shows_the_queue_and_hides_other_clients_ids(daemon) -> None:
    alice, bob = Peer(daemon.address), Peer(daemon.address)
    try:
        running = alice.send("generate", **{**JOB, "num_inference_steps": 80})
        alice.until(running, {"progress"})
        waiting = bob.send("generate", **JOB)
        bob.until(waiting, {"accepted"})
        status = bob.answer("status")
        assert status["model"] == "tiny-sd" and status["device"] == "cpu"
        assert [(q["state"], q["mine"], q["id"]) for q in status["queue"]] == [
            ("running", False, None),
            ("queued", True, waiting),
        ]
        assert status["running"]["total"] == 80
        alice.until(running)
        bob.until(waiting)
    finally:
        alice.close()
        bob.close()


def test_a_client_that_vanishes_mid_job_loses_nothing_and_blocks_no_one(daemon) -> None:
    leaver = Peer(daemon.address)
    rid = leaver.send("generate", **{**JOB, "num_inference_steps": 30, "seed": 9090})
    leaver.until(rid, {"progress"})
    leaver.close()
    stayer = Peer(daemon.address)
    try:
        assert stayer.generate(**JOB)[-1]["event"] == "result"
    finally:
        stayer.close()
    saved = list(daemon.output_dir.glob("*/*-9090.png"))
    assert len(saved) == 1
    with Image.open(saved[0]) as png:
        assert "Seed: 9090" in png.text["parameters"]


def test_sigterm_answers_queued_jobs_and_exits_cleanly(daemon_factory) -> None:
    own = daemon_factory()
    peer = Peer(own.address)
    try:
        running = peer.send("generate", **{**JOB, "num_inference_steps": 150})
        queued = peer.send("generate", **JOB)
        peer.until(running, {"progress"})
        assert own.stop(signal.SIGTERM) == 0
        while True:
            terminal = [e for e in peer.inbox if e["event"] in protocol.TERMINAL_EVENTS]
            if len(terminal) >= 2:
                break
            peer.receive(5)
        terminal = {e["id"]: (e["event"], e["reason"]) for e in terminal}
        shut = ("cancelled", "shutdown")
        assert terminal == {running: shut, queued: shut}
    finally:
        peer.close()
