"""An editor session's history: every image kept with where and how it was painted."""

from __future__ import annotations

from helpers import solid_image

from sdbridge.editor.canvas import Extent, plan_job
from sdbridge.editor.history import History
from sdbridge.editor.session import Result, ResultImage, Settings


def result(seeds: list[int], side: int = 4) -> Result:
    images = tuple(
        ResultImage(solid_image(side, side, (seed % 256, 0, 0, 255)), seed, f"/out/{seed}.png", "p")
        for seed in seeds
    )
    return Result(images, 1.0, None)


def test_each_image_is_kept_with_its_own_seed_and_the_jobs_settings_and_place():
    history = History()
    plan = plan_job(Extent(4, 4), None)
    settings = Settings("a cat", num_inference_steps=4, num_images=2)
    first = history.add(settings, plan, result([7, 8]))
    newer = history.add(Settings("a dog"), plan, result([3]))
    assert [item.seed for item in history] == [3, 7, 8]  # the newest job first, in job order
    assert first[1].settings == Settings("a cat", num_inference_steps=4, seed=8, num_images=1)
    assert first[1].plan == plan and first[1].path == "/out/8.png"
    assert history.get(newer[0].number) == newer[0] and history.get(999) is None
    assert len({item.number for item in history}) == 3


def test_the_oldest_images_go_when_the_history_is_full():
    history = History(max_bytes=3 * 4 * 4 * 4)  # room for three 4x4 images
    plan = plan_job(Extent(4, 4), None)
    for seed in range(5):
        history.add(Settings("x"), plan, result([seed]))
    assert [item.seed for item in history] == [4, 3, 2]
    # One image larger than the whole budget is still kept: the newest is never dropped.
    history.add(Settings("x"), plan, result([9], side=16))
    assert [item.seed for item in history] == [9]
