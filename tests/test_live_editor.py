"""Live mode's rules, without an editor: a change that holds still sends a job, a stroke still
being drawn sends nothing, only the newest job's image shows, and a live job asks for little."""

from __future__ import annotations

import dataclasses

from sdbridge.editor.control import ControlChoice
from sdbridge.editor.live import (
    DEBOUNCE_S,
    LIVE_STEPS,
    POLL_S,
    LayerState,
    LiveScheduler,
    Snapshot,
    live_settings,
    next_poll_s,
    selection_state,
)
from sdbridge.editor.session import ModelDefaults, Settings

STANDARD = ModelDefaults(20, 7.5, None)
TURBO = ModelDefaults(4, 0.0, "Euler a")


def layer(pixels: bytes, visible: bool = True, opacity: int = 255, id: str = "paint") -> LayerState:
    return LayerState.of(id, visible, opacity, "normal", pixels)


def snapshot(*layers: LayerState, selection: int | None = None, prompt: str = "a cat") -> Snapshot:
    return Snapshot(layers, selection, Settings(prompt, strength=0.5))


# --- what counts as a change ------------------------------------------------------------------


def test_a_layer_state_changes_with_its_pixels_visibility_and_opacity_only():
    base = layer(b"\x01\x02\x03\x04")
    assert layer(b"\x01\x02\x03\x04") == base
    assert layer(b"\x01\x02\x03\x05") != base
    assert layer(b"\x01\x02\x03\x04", opacity=128) != base
    assert layer(b"\x01\x02\x03\x04", visible=False) != base
    # A hidden layer's pixels do not show: painting on it changes nothing that matters.
    assert layer(b"\x01", visible=False) == layer(b"\x02", visible=False)
    assert layer(None, visible=False) == layer(b"\x02", visible=False)


def test_a_selection_state_changes_with_its_place_and_its_mask():
    mask = b"\xff" * 4
    assert selection_state(0, 0, 2, 2, mask) == selection_state(0, 0, 2, 2, mask)
    assert selection_state(1, 0, 2, 2, mask) != selection_state(0, 0, 2, 2, mask)
    assert selection_state(0, 0, 2, 2, b"\xff\xff\xff\x00") != selection_state(0, 0, 2, 2, mask)


# --- when a job goes out ----------------------------------------------------------------------


def test_a_change_is_sent_once_it_has_held_still_for_the_debounce():
    scheduler = LiveScheduler(debounce_s=0.05)
    first = snapshot(layer(b"a"))
    assert not scheduler.observe(first, 0.0)
    assert not scheduler.observe(first, 0.04)
    assert scheduler.observe(first, 0.05)
    assert scheduler.sent(first) == 1
    # Sent: the same canvas sends nothing more, however long it stays.
    assert not scheduler.observe(first, 0.1)
    assert not scheduler.observe(first, 10.0)


def test_a_stroke_being_drawn_sends_nothing_until_it_stops():
    scheduler = LiveScheduler(debounce_s=0.05)
    now = 0.0
    for step in range(20):  # a long stroke: the layer changes at every poll
        assert not scheduler.observe(snapshot(layer(bytes([step]))), now)
        now += POLL_S
    last = snapshot(layer(bytes([19])))
    assert scheduler.observe(last, now + DEBOUNCE_S)


def test_a_control_layer_switched_on_or_its_kind_or_strength_changed_is_a_change():
    scheduler = LiveScheduler(debounce_s=0.0)
    canvas = snapshot(layer(b"a"))
    scheduler.sent(canvas)
    scribble = dataclasses.replace(canvas, controls=(("layer-1", ControlChoice()),))
    assert scheduler.observe(scribble, 0.0)
    scheduler.sent(scribble)
    for changed in (ControlChoice(strength=0.5), ControlChoice(preprocessor="canny")):
        steered = dataclasses.replace(canvas, controls=(("layer-1", changed),))
        assert scheduler.observe(steered, 0.0)
    back = dataclasses.replace(canvas, controls=(("layer-1", ControlChoice()),))
    assert not scheduler.observe(back, 0.0), "as it was sent"


def test_a_new_prompt_or_selection_is_a_change_too_and_going_back_is_one_again():
    scheduler = LiveScheduler(debounce_s=0.0)
    canvas = layer(b"a")
    scheduler.sent(snapshot(canvas))
    assert scheduler.observe(snapshot(canvas, prompt="a dog"), 0.0)
    scheduler.sent(snapshot(canvas, prompt="a dog"))
    assert scheduler.observe(snapshot(canvas, prompt="a dog", selection=7), 1.0)
    scheduler.sent(snapshot(canvas, prompt="a dog", selection=7))
    assert scheduler.observe(snapshot(canvas), 2.0), "undoing back to an older canvas"


# --- which image shows ------------------------------------------------------------------------


def test_only_the_newest_jobs_image_shows():
    scheduler = LiveScheduler(debounce_s=0.0)
    first = scheduler.sent(snapshot(layer(b"a")))
    second = scheduler.sent(snapshot(layer(b"b")))
    # The first job's image is of a canvas that has changed since: it never shows.
    assert not scheduler.land(first)
    assert scheduler.land(second)
    assert not scheduler.land(second), "an image shows once"


def test_an_image_that_arrives_after_a_newer_job_went_out_is_dropped():
    scheduler = LiveScheduler(debounce_s=0.0)
    first = scheduler.sent(snapshot(layer(b"a")))
    assert scheduler.land(first)
    second = scheduler.sent(snapshot(layer(b"b")))
    third = scheduler.sent(snapshot(layer(b"c")))
    assert not scheduler.land(second)
    assert scheduler.land(third)


# --- what a live job asks for -----------------------------------------------------------------


def test_a_live_job_is_one_image_without_previews_or_refine_at_the_runs_seed():
    chosen = Settings(
        "a cat", strength=0.4, num_images=3, preview_every=2, refine_strength=0.3, guidance_scale=6
    )
    settings = live_settings(chosen, STANDARD, seed=42)
    assert settings.num_images == 1 and settings.preview_every == 0
    assert settings.refine_strength is None
    assert settings.seed == 42 and settings.strength == 0.4 and settings.guidance_scale == 6
    assert live_settings(Settings("a cat", seed=7), STANDARD, seed=42).seed == 7, "a fixed seed"


def test_a_live_job_runs_few_steps_unless_the_artist_chose_them():
    assert live_settings(Settings("x"), STANDARD, 1).num_inference_steps == LIVE_STEPS
    assert live_settings(Settings("x"), None, 1).num_inference_steps == LIVE_STEPS
    # A few-step model's own default is left to the daemon; so is a number the artist set.
    assert live_settings(Settings("x"), TURBO, 1).num_inference_steps is None
    assert (
        live_settings(Settings("x", num_inference_steps=12), STANDARD, 1).num_inference_steps == 12
    )


def test_polls_space_out_when_looking_costs_more_than_a_share_of_the_time():
    assert next_poll_s(0.001) == POLL_S
    assert next_poll_s(0.01) >= 0.09  # a large canvas: at most a tenth of the time on polls
