"""The editor session every front-end uses: requests carry only what the artist set, events
become one view of the job, the daemon's offer feeds the widgets, and Cancel never traps."""

from __future__ import annotations

import time

import pytest
from helpers import DaemonProcess, SilentDaemon, free_port, solid_image, wait_until

from sdbridge.editor.canvas import Bounds, Extent, plan_area, plan_job
from sdbridge.editor.session import (
    CANCEL_GRACE_S,
    NOTHING_ADDED,
    Accepted,
    Cancelled,
    DaemonInfo,
    Failed,
    JobView,
    Loading,
    LoraChoice,
    ModelDefaults,
    Phase,
    Preview,
    Progress,
    Result,
    ResultImage,
    Session,
    Settings,
    Started,
    advance,
    check_settings,
    editor_fields,
    link_text,
    parse_event,
    parse_loras,
    request_fields,
    start_cancelling,
)
from sdbridge.wire import protocol
from sdbridge.wire.client import Link

CANVAS = Extent(400, 300)
TOKEN = "a-token-of-the-right-length-0123456789"


def solid(extent: Extent, rgba: tuple[int, int, int, int]) -> bytes:
    return bytes(rgba) * extent.pixel_count


# --- requests: only what the artist set --------------------------------------------------------


def test_a_request_left_at_model_default_sends_no_steps_guidance_or_scheduler():
    fields = editor_fields(Settings("a cat"), plan_job(CANVAS, None), None)
    assert fields == {"prompt": "a cat", "width": 400, "height": 300}


def test_every_field_the_artist_set_is_sent_as_set():
    settings = Settings(
        "a cat",
        negative_prompt="blurry",
        model="tiny-sd-turbo",
        num_inference_steps=12,
        guidance_scale=0,
        scheduler="Euler a",
        seed=5,
        num_images=3,
        loras=(LoraChoice("ink", 0.5),),
        refine_strength=0.3,
        preview_every=2,
    )
    fields = request_fields(settings, 64, 48, exact_size=True)
    assert fields == {
        "prompt": "a cat",
        "negative_prompt": "blurry",
        "model": "tiny-sd-turbo",
        "num_inference_steps": 12,
        "guidance_scale": 0.0,
        "scheduler": "Euler a",
        "seed": 5,
        "num_images": 3,
        "loras": [{"name": "ink", "weight": 0.5}],
        "refine_strength": 0.3,
        "preview_every": 2,
        "width": 64,
        "height": 48,
        "exact_size": True,
    }
    assert isinstance(fields["guidance_scale"], float)


def test_lower_strength_sends_the_canvas_as_init_image():
    plan = plan_job(CANVAS, None)
    canvas = solid(CANVAS, (9, 8, 7, 255))
    fields = editor_fields(Settings("a cat", strength=0.4), plan, canvas)
    assert fields["strength"] == 0.4
    assert fields["init_image"] == {"width": 400, "height": 300, "format": "raw", "data": canvas}
    assert "seed" not in fields  # random: the daemon picks and reports it
    with pytest.raises(ValueError):
        editor_fields(Settings("a cat", strength=0.4), plan, None)
    # Full strength without a selection paints from scratch: no pixels, no strength.
    assert "strength" not in editor_fields(Settings("a cat", strength=1.0), plan, None)


def test_selection_becomes_the_inpainting_mask_over_the_job_region():
    sel = Bounds(100, 100, 40, 20)
    plan = plan_job(CANVAS, sel)
    job = plan.bounds
    rgba = solid(job.extent, (1, 2, 3, 255))
    fields = editor_fields(Settings("a cat"), plan, rgba)
    assert (fields["width"], fields["height"]) == (job.width, job.height)
    assert fields["strength"] == 1.0 and fields["init_image"]["data"] == rgba
    mask = fields["mask_image"]
    assert (mask["width"], mask["height"], mask["format"]) == (job.width, job.height, "raw")
    at = (((sel.y - job.y) * job.width + sel.x - job.x) * 4) + 0
    before = at - 4  # the pixel left of the selection
    assert mask["data"][at : at + 4] == b"\xff\xff\xff\xff"
    assert mask["data"][before : before + 4] == b"\x00\x00\x00\xff"


def test_area_plan_paints_exactly_the_selection_bounds_without_pixels():
    plan = plan_area(CANVAS, Bounds(380, -10, 40, 30))
    fields = editor_fields(Settings(prompt="p"), plan, None)
    assert (fields["width"], fields["height"]) == (20, 20) and "init_image" not in fields


def test_requests_pass_the_daemons_own_validation():
    settings = Settings("a cat", "blurry", None, 8, 5.0, None, 0.6, 3, 2, preview_every=2)
    modes = []
    for selection in (None, Bounds(10, 10, 30, 30)):
        plan = plan_job(CANVAS, selection)
        fields = editor_fields(settings, plan, solid(plan.bounds.extent, (0, 0, 0, 255)))
        message = {"v": 1, "op": "generate", "id": "j1", **fields}
        protocol.validate_envelope(message)
        modes.append(protocol.validate_generate(message, protocol.Limits()).mode)
    assert modes == ["img2img", "inpaint"]


def test_settings_are_checked_against_the_daemons_limits():
    info = DaemonInfo.from_events(
        {"model": "m", "models": ["m"], "limits": {"max_steps": 40, "max_images": 2}}
    )
    assert check_settings(Settings("  ")) == "Type a prompt first."
    assert (
        check_settings(Settings("a", seed=2**32)) == f"The seed must be between 0 and {2**32 - 1}."
    )
    assert check_settings(Settings("a", num_inference_steps=41), info) == (
        "The steps must be between 1 and 40."
    )
    assert "1 to 2 images" in check_settings(Settings("a", num_images=3), info)
    assert "no model “x”" in check_settings(Settings("a", model="x"), info)
    no_lora = check_settings(Settings("a", loras=(LoraChoice("ink"),)), info)
    assert no_lora == "The daemon has no LoRA “ink”; its LoRAs: none."
    assert check_settings(Settings("a", num_inference_steps=40, model="m"), info) is None


# --- what the daemon offers --------------------------------------------------------------------


def test_daemon_info_reads_limits_models_and_per_model_defaults():
    hello = {
        "server": "0.1.0",
        "device": "cpu",
        "model": "a",
        "models": ["a", "b"],
        "schedulers": ["Euler", "Euler a"],
        "loras": ["ink"],
        "capabilities": ["txt2img", "models"],
        "limits": {"max_steps": 40, "max_images": 3, "a_limit_from_the_future": 1},
    }
    models = {
        "models": [
            {"name": "a", "defaults": {"num_inference_steps": 20, "guidance_scale": 7.5}},
            {
                "name": "b",
                "defaults": {
                    "num_inference_steps": 4,
                    "guidance_scale": 0,
                    "scheduler": "Euler a",
                },
            },
        ]
    }
    info = DaemonInfo.from_events(hello, models)
    assert info.limits.max_steps == 40 and info.limits.max_images == 3
    assert info.limits.max_side == protocol.Limits().max_side  # not given: ours
    assert info.models == ("a", "b") and info.schedulers == ("Euler", "Euler a")
    assert info.defaults_for(None) == ModelDefaults(20, 7.5, None)
    assert info.defaults_for("b").describe() == "4 steps, guidance 0, Euler a"


# --- events and the view -----------------------------------------------------------------------


def wire_result(path: str | None = "/out/00001-7.png", warning: str | None = None) -> dict:
    image = {**solid_image(2, 2, (1, 2, 3, 255)), "seed": 7, "path": path, "parameters": "p"}
    return {"event": "result", "images": [image], "elapsed": 1.5, "warning": warning}


def test_every_event_kind_parses_to_its_dataclass():
    image = solid_image(1, 1, (0, 0, 0, 255))
    assert parse_event({"event": "accepted", "position": 2}) == Accepted(2)
    assert parse_event({"event": "started"}) == Started()
    assert parse_event({"event": "loading", "model": "m"}) == Loading("m")
    assert parse_event({"event": "progress", "step": 1, "total": 4, "eta": 0.5}) == Progress(
        1, 4, 0.5
    )
    assert parse_event({"event": "preview", "step": 1, "total": 4, "image": image}) == Preview(
        1, 4, image
    )
    result = parse_event(wire_result())
    assert isinstance(result, Result) and result.images[0].seed == 7 and result.elapsed == 1.5
    assert parse_event(
        {"event": "error", "code": "busy", "message": "full", "field": None}
    ) == Failed("busy", "full", None)
    assert parse_event({"event": "cancelled", "reason": "client"}) == Cancelled("client")
    assert parse_event({"event": "something_new"}) is None


def run_events(*events: dict, cancel_after: int | None = None) -> list[JobView]:
    views = [JobView()]
    for i, event in enumerate(events):
        if cancel_after == i:
            views.append(start_cancelling(views[-1]))
        views.append(advance(views[-1], parse_event(event)))
    return views


def test_a_job_goes_from_queued_through_steps_to_its_result():
    views = run_events(
        {"event": "accepted", "position": 1},
        {"event": "started"},
        {"event": "progress", "step": 1, "total": 2, "eta": 3.0},
        {"event": "preview", "step": 1, "total": 2, "image": solid_image(1, 1, (0, 0, 0, 255))},
        {"event": "progress", "step": 2, "total": 2, "eta": 0.0},
        wire_result(),
    )
    assert [v.phase for v in views] == [
        Phase.SENDING,
        Phase.QUEUED,
        Phase.RUNNING,
        Phase.RUNNING,
        Phase.RUNNING,
        Phase.RUNNING,
        Phase.FINISHED,
    ]
    assert views[1].message == "Queued behind 1 job(s) …"
    assert (views[3].step, views[3].total, views[3].message) == (1, 2, "Step 1/2, 3 s left")
    assert views[4].preview is not None and views[4].step == 1
    done = views[-1]
    assert done.done and not done.is_error and done.message == "Saved as /out/00001-7.png."
    assert done.result is not None and done.result.images[0] == ResultImage(
        wire_result()["images"][0], 7, "/out/00001-7.png", "p"
    )


def test_an_unsaved_result_says_so_instead_of_a_path():
    done = run_events(wire_result(None, "not saved: no space left on device"))[-1]
    assert done.phase is Phase.FINISHED
    assert done.message == "The daemon's own copy was not saved: no space left on device."


def test_a_result_that_arrives_after_cancel_adds_nothing():
    views = run_events({"event": "started"}, wire_result(), cancel_after=1)
    assert views[2].cancelling and views[2].message == "Cancelling …"
    assert views[-1].phase is Phase.CANCELLED and views[-1].message == NOTHING_ADDED
    assert views[-1].result is None


def test_a_cancel_nobody_asked_for_is_an_error_and_a_failure_reads_plainly():
    shutdown = run_events({"event": "cancelled", "reason": "shutdown"})[-1]
    assert shutdown.phase is Phase.CANCELLED and shutdown.is_error
    assert "shutting down" in shutdown.message
    busy = run_events({"event": "error", "code": "busy", "message": "queue full"})[-1]
    assert busy.phase is Phase.FAILED and busy.message.startswith("The daemon's queue is full")
    other = {"event": "error", "code": "out_of_range", "message": "too big", "field": "width"}
    refused = run_events(other)[-1]
    assert refused.message == "The daemon refused the job: too big (width)"
    assert refused.failure == Failed("out_of_range", "too big", "width")


def test_a_finished_view_ignores_late_and_unknown_events():
    done = run_events(wire_result())[-1]
    assert advance(done, Progress(1, 2, 0.0)) is done
    assert advance(JobView(), None) == JobView()


def test_link_states_read_as_sentences():
    address = "tcp://127.0.0.1:7878"
    assert "needs a token" in link_text(Link.TOKEN_REQUIRED, address)
    assert "did not accept the token" in link_text(Link.TOKEN_REFUSED, address)
    assert "too many connections" in link_text(Link.FULL, address)
    assert "sdbridge serve" in link_text(Link.UNREACHABLE, address)
    assert all(address in link_text(link, address) for link in Link)


# --- against real daemons ---------------------------------------------------------------------


def test_a_session_job_without_steps_gets_the_few_step_models_preset(
    library_daemon: DaemonProcess,
) -> None:
    with Session(library_daemon.address) as session:
        assert session.client.wait_connected(10)
        info = session.info()
        assert info.defaults_for("tiny-sd-turbo") == ModelDefaults(4, 0.0, "Euler a")
        settings = Settings("a red circle", model="tiny-sd-turbo", seed=3, preview_every=1)
        fields = editor_fields(settings, plan_area(Extent(64, 64), None), None)
        generation = session.submit(fields)
        views = list(generation.views(timeout=120))
    done = views[-1]
    assert done.phase is Phase.FINISHED, done.message
    assert done.total == 4 and any(v.preview for v in views)
    assert "Steps: 4" in done.result.images[0].parameters
    assert "CFG scale: 0," in done.result.images[0].parameters


def test_a_batch_uses_consecutive_seeds_that_wrap_around(daemon: DaemonProcess) -> None:
    with Session(daemon.address) as session:
        assert session.client.wait_connected(10)
        settings = Settings("a", seed=2**32 - 2, num_images=3, num_inference_steps=1)
        generation = session.submit(request_fields(settings, 32, 32))
        done = list(generation.views(timeout=120))[-1]
    assert [image.seed for image in done.result.images] == [2**32 - 2, 2**32 - 1, 0]


def test_a_changed_limit_reaches_the_session(daemon_factory) -> None:
    daemon = daemon_factory("--max-steps", "40", "--max-images", "2")
    with Session(daemon.address) as session:
        assert session.client.wait_connected(10)
        limits = session.info().limits
    assert (limits.max_steps, limits.max_images) == (40, 2)


def test_the_link_says_why_the_daemon_refused_without_parsing_its_words(daemon_factory) -> None:
    daemon = daemon_factory(token=TOKEN)
    links: list[Link] = []
    with Session(daemon.address, token="w" * 32, on_link=lambda link, *_: links.append(link)):
        wait_until(lambda: Link.TOKEN_REFUSED in links, timeout=10)
    with Session(daemon.address) as session:
        wait_until(lambda: session.link is Link.TOKEN_REQUIRED, timeout=10)
        assert "needs a token" in session.link_text
    with Session(daemon.address, token=TOKEN) as session:
        assert session.client.wait_connected(10) and session.link is Link.CONNECTED
    with Session(f"tcp://127.0.0.1:{free_port()}") as session:
        assert session.link is Link.UNREACHABLE


def test_cancel_against_a_daemon_that_never_answers_gives_up_within_its_grace():
    changes: list[JobView] = []
    with SilentDaemon() as silent, Session(silent.address) as session:
        assert session.client.wait_connected(10)
        generation = session.submit({"prompt": "a"}, on_view=changes.append)
        time.sleep(0.2)
        assert generation.view.phase is Phase.SENDING
        started = time.monotonic()
        generation.cancel(grace=0.5)
        views = list(generation.views(timeout=5))
        waited = time.monotonic() - started
        wait_until(lambda: len(silent.requests) == 2)
    assert [r["op"] for r in silent.requests] == ["generate", "cancel"]
    assert views[-1].phase is Phase.CANCELLED and views[-1].is_error
    assert "did not confirm the cancel" in views[-1].message
    assert 0.5 <= waited < 2.0
    assert [v.phase for v in changes] == [Phase.SENDING, Phase.CANCELLED]
    assert CANCEL_GRACE_S <= 10  # the editors' bound


def test_a_refused_submission_is_a_failed_view_not_an_exception():
    with Session(f"tcp://127.0.0.1:{free_port()}") as session:
        generation = session.submit({"prompt": "a"})
        views = list(generation.views(timeout=5))
    assert [view.phase for view in views] == [Phase.FAILED]
    assert views[0].is_error and generation.view == views[0]
    assert views[0].message.startswith("The job was not sent: no sdbridge daemon at tcp://")


def test_generate_over_a_shaped_selection_sends_neither_pixels_nor_mask():
    plan = plan_area(CANVAS, Bounds(10, 10, 2, 1), bytes([0, 255]))
    assert editor_fields(Settings("a cat"), plan, None) == {
        "prompt": "a cat",
        "width": 2,
        "height": 1,
    }
    img2img = editor_fields(Settings("a cat", strength=0.5), plan, b"\x00" * 8)
    assert img2img["strength"] == 0.5 and "mask_image" not in img2img


def test_loras_as_text():
    assert parse_loras(" ink:0.7, styles/paper ,lcm:v2:1.5,, odd:x") == (
        LoraChoice("ink", 0.7),
        LoraChoice("styles/paper"),
        LoraChoice("lcm:v2", 1.5),
        LoraChoice("odd:x"),
    )
    assert parse_loras("") == ()
