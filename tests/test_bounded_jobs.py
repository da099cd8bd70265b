"""What one request can make a job do is bounded by the scheduler, whatever its numbers say.

A strength of 1e-9 once asked the scheduler for 10^9 timesteps (one request killed the daemon);
a batch from the highest seed once reported seeds no request may send back.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from helpers import Peer, raw_image, result_image

from sdbridge.daemon.engine import SEEDS, batch_seeds
from sdbridge.wire import protocol

JOB = {"prompt": "a red circle on a blue background", "num_inference_steps": 8, "seed": 42}


def progress_totals(events: list[dict[str, Any]]) -> list[tuple[int, int]]:
    return [(e["step"], e["total"]) for e in events if e["event"] == "progress"]


def test_the_lowest_strength_runs_one_step_of_a_schedule_no_longer_than_the_training_one(
    peer: Peer,
) -> None:
    """A strength below 1 / num_train_timesteps (1000 here) denoises as 1 / 1000 does."""
    init = raw_image(np.full((64, 64, 3), (200, 40, 40), np.uint8))
    lowest = peer.generate(**JOB, init_image=init, strength=1e-9)
    assert progress_totals(lowest) == [(1, 1)]
    assert lowest[-1]["parameters"].endswith("Denoising strength: 0.001")
    floor = peer.generate(**JOB, init_image=init, strength=0.001)
    assert np.array_equal(result_image(lowest), result_image(floor))


def test_the_lowest_refine_strength_adds_one_step_to_the_first_pass(peer: Peer) -> None:
    """512 px on the 64 px test model: 96 px first, a second pass at 192 px, then scaling."""
    events = peer.generate(**JOB, width=512, height=512, refine_strength=1e-9)
    assert progress_totals(events) == [(step, 9) for step in range(1, 10)]
    assert "Denoising strength: 0.001" in events[-1]["parameters"]


def test_image_i_of_a_batch_gets_seed_plus_i_modulo_2_to_the_32() -> None:
    assert SEEDS == 2**32 == protocol.MAX_SEED + 1
    assert batch_seeds(42, 3) == (42, 43, 44)
    assert batch_seeds(protocol.MAX_SEED - 1, 3) == (protocol.MAX_SEED - 1, protocol.MAX_SEED, 0)


def test_a_batch_from_the_highest_seed_wraps_to_seeds_that_can_be_asked_for(peer: Peer) -> None:
    batch = peer.generate(**{**JOB, "seed": protocol.MAX_SEED, "num_images": 3})
    assert [image["seed"] for image in batch[-1]["images"]] == [protocol.MAX_SEED, 0, 1]
    again = peer.generate(**{**JOB, "seed": batch[-1]["images"][2]["seed"]})
    # One image against a batch's: the same seed, within the batch's rounding (test_daemon).
    assert np.abs(result_image(again) - result_image(batch, 2)).max() <= 2
