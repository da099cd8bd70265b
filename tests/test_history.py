"""An editor session's history: every image kept with where and how it was painted."""

from __future__ import annotations

from helpers import solid_image

from sdbridge.editor.canvas import Extent, plan_job
from sdbridge.editor.history import (
    LOST_FOR_S,
    MAX_LOOK_INTERVAL_S,
    History,
    LostJobs,
    images_page,
    result_of,
)
from sdbridge.editor.results import ResultsPage, SavedResult
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


# --- jobs lost with the connection ------------------------------------------------------------


def saved(number: int, job: str, index: int = 0, image: bool = False) -> SavedResult:
    png = {"width": 4, "height": 4, "format": "png", "data": b"png"}
    return SavedResult(
        number,
        job,
        index,
        0.0,
        "a cat",
        "",
        "m",
        10 + index,
        4,
        4,
        "p",
        f"/out/{number}.png",
        png,
        png if image else None,
    )


def test_a_lost_job_is_found_once_all_its_images_are_listed_and_only_then():
    clock = [0.0]
    lost = LostJobs(clock=lambda: clock[0])
    plan = plan_job(Extent(4, 4), None)
    lost.add("k-2", Settings("a cat", num_images=2), plan, where="doc")
    assert lost and lost.ids == {"k-2"}
    # Someone else's results, and the first of its two images: not yet.
    assert lost.found(ResultsPage((saved(5, "other"), saved(4, "k-2")), False)) == []
    page = ResultsPage((saved(6, "k-2", 1), saved(5, "other"), saved(4, "k-2")), False)
    [(job, found)] = lost.found(page)
    assert job.job == "k-2" and job.plan == plan and job.where == "doc"
    assert [entry.index for entry in found] == [0, 1], "in the job's order"
    assert not lost


def test_a_lost_job_never_listed_is_given_up_after_a_while():
    clock = [0.0]
    lost = LostJobs(clock=lambda: clock[0])
    lost.add("k-1", Settings("a cat"), plan_job(Extent(4, 4), None))
    assert lost.found(ResultsPage((), False)) == [] and lost
    clock[0] = LOST_FOR_S + 1
    assert lost.found(ResultsPage((), False)) == [] and not lost


def test_looks_for_a_lost_job_come_at_once_then_further_apart():
    lost = LostJobs()
    waits = [lost.next_look_s() for _ in range(8)]
    assert waits[:3] == [1.0, 2.0, 4.0] and waits[-1] == MAX_LOOK_INTERVAL_S
    lost.reconnected()
    assert lost.next_look_s() == 1.0


def test_the_images_are_asked_for_over_exactly_the_lost_jobs_results():
    page = ResultsPage(
        (saved(9, "other"), saved(8, "k-1", 1), saved(7, "x"), saved(6, "k-1")), True
    )
    assert images_page(page, {"k-1"}) == (9, 3)  # numbers 6..8
    assert images_page(page, {"k-7"}) is None


def test_a_lost_jobs_saved_images_become_the_result_it_never_got():
    found = (saved(4, "k-1", 0, image=True), saved(5, "k-1", 1, image=True))
    raw = [solid_image(4, 4, (1, 2, 3, 255)), solid_image(4, 4, (4, 5, 6, 255))]
    result = result_of(found, raw)
    assert [image.seed for image in result.images] == [10, 11]
    assert [image.path for image in result.images] == ["/out/4.png", "/out/5.png"]
    assert result.images[1].image == raw[1] and result.warning is None
    history = History()
    items = history.add(Settings("a cat", num_images=2), plan_job(Extent(4, 4), None), result)
    assert [item.seed for item in items] == [10, 11]
