"""An editor session's history: every image kept with where and how it was painted."""

from __future__ import annotations

from dataclasses import replace

from helpers import solid_image

from sdbridge.editor.canvas import Extent, plan_job
from sdbridge.editor.history import (
    LOST_FOR_S,
    MAX_LOOK_INTERVAL_S,
    RESTORED_RESULTS,
    History,
    LostJobs,
    images_page,
    own_results,
    result_of,
    saved_settings,
)
from sdbridge.editor.results import ResultsPage, SavedResult
from sdbridge.editor.session import LoraChoice, Result, ResultImage, Settings


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


def saved(
    number: int, job: str, index: int = 0, image: bool = False, mine: bool = False
) -> SavedResult:
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
        mine,
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
    assert images_page([s for s in page.results if s.job == "k-1"]) == (9, 3)  # numbers 6..8
    assert images_page([]) is None


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


# --- an earlier session's results -------------------------------------------------------------


def test_only_the_artists_own_newest_results_come_back():
    """A daemon without a token lists everyone's results: `mine` tells the artist's apart."""
    page = ResultsPage(tuple(saved(n, f"k-{n}", mine=n % 3 != 0) for n in range(60, 0, -1)), True)
    own = own_results(page)
    assert len(own) == RESTORED_RESULTS and all(entry.mine for entry in own)
    assert [entry.number for entry in own][:4] == [59, 58, 56, 55], "newest first"
    assert own_results(ResultsPage((saved(1, "k", mine=False),), False)) == ()


def decode(png):
    """Stands in for the editor's PNG decoder: a raw image of the PNG's size."""
    return solid_image(png["width"], png["height"], (1, 2, 3, 255))


def test_an_earlier_sessions_results_join_the_history_after_this_sessions_once():
    history = History()
    plan = plan_job(Extent(4, 4), None)
    history.add(Settings("now"), plan, result([1]))
    found = [saved(9, "k-2", image=True, mine=True), saved(8, "k-1", image=True, mine=True)]
    gone = saved(7, "k-0", image=False, mine=True)  # its file was moved away
    items = history.restore([*found, gone], decode)
    assert [item.path for item in items] == ["/out/9.png", "/out/8.png"]
    assert [item.seed for item in history] == [1, 10, 10], "older than this session's"
    assert items[0].image == decode(found[0].image) and items[0].parameters == "p"
    # No place of its own: the image's own size at the canvas's origin.
    assert items[0].plan == plan_job(Extent(4, 4), None)
    assert len({item.number for item in history}) == 3
    # Connected again, or to the same daemon at another address: nothing joins twice.
    assert history.restore(found, decode) == [] and len(history) == 3
    # A result this session made itself is not restored beside it either.
    made = saved(5, "k-5", image=True, mine=True)
    history.add(Settings("x"), plan, result([5]))  # its path is /out/5.png
    assert history.restore([made], decode) == []


def test_restored_results_are_the_first_to_go_when_the_history_is_full():
    history = History(max_bytes=2 * 4 * 4 * 4)  # room for two 4x4 images
    plan = plan_job(Extent(4, 4), None)
    history.add(Settings("now"), plan, result([1]))
    found = [saved(n, f"k-{n}", image=True, mine=True) for n in (9, 8, 7)]
    items = history.restore(found, decode)
    assert [item.path for item in items] == ["/out/9.png"], "only what the history kept"
    assert [item.path for item in history] == ["/out/1.png", "/out/9.png"]


def with_parameters(prompt: str, parameters: str) -> SavedResult:
    return replace(saved(3, "k"), prompt=prompt, negative_prompt="blur", parameters=parameters)


def test_a_saved_images_settings_are_read_back_from_its_a1111_text():
    found = with_parameters(
        "a cat\non a mat",
        "a cat on a mat <lora:ink:0.5> <lora:soft-light:-1.25>\n"
        "Negative prompt: blur\n"
        "Steps: 12, Sampler: DPM++ 2M, CFG scale: 6.5, Seed: 10, Size: 4x4, Model: m, "
        "Denoising strength: 0.6",
    )
    assert saved_settings(found) == Settings(
        prompt="a cat\non a mat",
        negative_prompt="blur",
        model="m",
        num_inference_steps=12,
        guidance_scale=6.5,
        scheduler="DPM++ 2M",
        strength=0.6,
        seed=10,
        loras=(LoraChoice("ink", 0.5), LoraChoice("soft-light", -1.25)),
    )


def test_what_a_saved_images_text_does_not_say_plainly_is_left_to_the_model():
    # A second pass: the denoising strength may be the init image's or the refine pass's.
    refined = saved_settings(
        with_parameters(
            "a <lora:typed:1> cat",
            "a <lora:typed:1> cat\nSteps: 4, Sampler: Euler a, CFG scale: 0, Seed: 10, "
            "Size: 4x4, Model: m, Denoising strength: 0.3, Hires upscale: 2",
        )
    )
    assert (refined.strength, refined.refine_strength) == (None, None)
    assert refined.loras == (), "a tag the artist typed is part of the prompt"
    assert (refined.num_inference_steps, refined.guidance_scale) == (4, 0.0)
    # A damaged text: whatever cannot be read is the model's default.
    damaged = saved_settings(with_parameters("a cat", "a cat\nSteps: many, CFG scale: 7.5"))
    assert (damaged.num_inference_steps, damaged.guidance_scale, damaged.scheduler) == (
        None, 7.5, None,
    )  # fmt: skip
    assert saved_settings(with_parameters("a cat", "")) == Settings("a cat", "blur", "m", seed=10)
