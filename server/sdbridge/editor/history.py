"""What an editor session has generated: every image with where it was painted and how, so that
nothing is lost and any of it can be applied again or its settings reused.

Pure Python: it runs inside Krita and GIMP. Images are kept as the daemon sent them (raw RGBA);
the oldest go once the history holds more than `max_bytes` of pixels.

A job whose connection dropped while it ran still ends on the daemon, which saves its images
and lists them with `results`: `LostJobs` remembers such jobs until their images are found
there, so that they join the history like any other. The artist's results of an earlier editor
session come back the same way (`own_results`, `History.restore`), older than this session's.
"""

from __future__ import annotations

import itertools
import re
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from ..wire.protocol import MAX_RESULTS_PAGE
from .canvas import Extent, JobPlan, plan_job
from .results import ResultsPage, SavedResult
from .session import LoraChoice, Result, ResultImage, Session, Settings

MAX_BYTES = 256 << 20  # about 250 images of 512x512
# A lost job is looked for this long: longer than any job runs, shorter than the daemon keeps
# its results listed (its last 500).
LOST_FOR_S = 15 * 60.0
# The first look comes at once on reconnecting; then, while the job may still be running,
# again after 1 s, 2 s, 4 s ... at most this far apart.
MAX_LOOK_INTERVAL_S = 30.0
# How many of the artist's newest results an editor brings back from an earlier session: about
# a strip's worth, and few enough that fetching their PNGs takes a moment.
RESTORED_RESULTS = 20
# A1111's last line: "Steps: 20, Sampler: Euler a, CFG scale: 7.5, ...".
_FIELD = re.compile(r"(?:^|, )([A-Z][A-Za-z ]*): ([^,]*)")
# The LoRA tags the daemon writes after the prompt: " <lora:name:weight>".
_LORA = re.compile(r" <lora:([^:<>]+):([^:<>]+)>")
_T = TypeVar("_T")


@dataclass(frozen=True)
class HistoryItem:
    number: int  # unique in its history, counting up
    image: Mapping[str, Any]  # the raw wire image
    settings: Settings  # the job's settings, with this image's seed fixed
    # Where it was painted: its place on the canvas, its selection. An earlier session's image
    # has no place of its own: its own size at the canvas's origin.
    plan: JobPlan
    parameters: str  # the daemon's A1111 text: what really ran (defaults filled in)
    path: str | None  # the daemon's saved copy

    @property
    def seed(self) -> int:
        assert self.settings.seed is not None
        return self.settings.seed

    @property
    def size_bytes(self) -> int:
        return len(self.image["data"])


class History:
    """The session's results, newest first."""

    def __init__(self, max_bytes: int = MAX_BYTES) -> None:
        self.max_bytes = max_bytes
        self._items: list[HistoryItem] = []
        self._bytes = 0
        self._numbers = itertools.count(1)

    def __iter__(self) -> Iterator[HistoryItem]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def add(self, settings: Settings, plan: JobPlan, result: Result) -> list[HistoryItem]:
        """Every image of a finished job, in the job's order; returns the new items."""
        added = [
            HistoryItem(
                next(self._numbers),
                image.image,
                replace(settings, seed=image.seed, num_images=1),
                plan,
                image.parameters,
                image.path,
            )
            for image in result.images
        ]
        self._items[:0] = added
        self._bytes += sum(item.size_bytes for item in added)
        self._trim()
        return added

    def restore(
        self,
        found: Sequence[SavedResult],
        decode: Callable[[Mapping[str, Any]], Mapping[str, Any]],
    ) -> list[HistoryItem]:
        """Saved results of an earlier session (newest first, as `results` lists them): older
        than anything this session made, they join at the end. Those without their image, and
        those the history already holds (the same saved file), are left out; `decode` turns the
        PNG wire image of each one that joins into a raw one. Returns the items kept."""
        held = {item.path for item in self._items}
        added = []
        for saved in found:
            if saved.image is None or saved.path is None or saved.path in held:
                continue
            held.add(saved.path)
            image = decode(saved.image)
            plan = plan_job(Extent(image["width"], image["height"]), None)
            number = next(self._numbers)
            added.append(
                HistoryItem(
                    number, image, saved_settings(saved), plan, saved.parameters, saved.path
                )
            )
        before = len(self._items)
        self._items.extend(added)
        self._bytes += sum(item.size_bytes for item in added)
        self._trim()  # the oldest go first: when the history is full, these
        return added[: len(self._items) - before]

    def _trim(self) -> None:
        while len(self._items) > 1 and self._bytes > self.max_bytes:
            self._bytes -= self._items.pop().size_bytes

    def get(self, number: int) -> HistoryItem | None:
        return next((item for item in self._items if item.number == number), None)


@dataclass(frozen=True)
class LostJob:
    """A job whose `result` never came: the connection dropped while the daemon ran it."""

    job: str  # the `generate` request's id, which `results` lists its images under
    settings: Settings
    plan: JobPlan
    where: Any = None  # what the front-end needs to place it (Krita: its document)
    lost_at: float = 0.0  # monotonic time


def result_of(found: Sequence[SavedResult], images: Sequence[Mapping[str, Any]]) -> Result:
    """The `Result` a lost job's `result` event would have been: its saved results, in the
    job's order, with their images decoded to raw RGBA (`images`, in the same order)."""
    return Result(
        tuple(
            ResultImage(image, saved.seed, saved.path, saved.parameters)
            for saved, image in zip(found, images, strict=True)
        ),
        0.0,
        None,
    )


def images_page(wanted: Collection[SavedResult]) -> tuple[int, int] | None:
    """`before` and `limit` of the page that holds these results (listed without images) with
    their images; None for none."""
    numbers = [saved.number for saved in wanted]
    if not numbers:
        return None
    return max(numbers) + 1, min(MAX_RESULTS_PAGE, max(numbers) - min(numbers) + 1)


def with_images(session: Session, wanted: Collection[SavedResult]) -> ResultsPage | None:
    """These results (listed without images) asked for again with their images, in one page;
    None when none are wanted. Lists are cheap, images are not: ask for them last."""
    span = images_page(wanted)
    return None if span is None else session.results(*span, images=True)


def own_results(page: ResultsPage, limit: int = RESTORED_RESULTS) -> tuple[SavedResult, ...]:
    """The newest `limit` results of `page` that are the artist's own: a daemon without a token
    lists everyone's."""
    return tuple(saved for saved in page.results if saved.mine)[:limit]


def saved_settings(saved: SavedResult) -> Settings:
    """The settings of a saved image, as "Use settings" loads them: its prompt, negative prompt,
    model and seed, and from its A1111 text the steps, guidance, sampler, LoRAs and strength. A
    job with a second pass records only one "Denoising strength", its init image's or its
    refine pass's, without saying which: both are then left unset."""
    lines = saved.parameters.splitlines()
    fields: dict[str, str] = {}
    # The parameters are the last line, after the prompt (and the negative prompt).
    for name, value in _FIELD.findall(lines[-1] if len(lines) > 1 else ""):
        fields.setdefault(name, value.strip())  # the first: a model's name could hold ", X: "
    # The LoRA tags follow the prompt on its line, which the daemon wrote as one line.
    prompt = " ".join(saved.prompt.splitlines())
    tags = lines[0][len(prompt) :] if lines and lines[0].startswith(prompt) else ""
    weights = [(name, _parsed(weight, float)) for name, weight in _LORA.findall(tags)]
    second_pass = "Hires upscale" in fields
    return Settings(
        prompt=saved.prompt,
        negative_prompt=saved.negative_prompt,
        model=saved.model or None,
        num_inference_steps=_parsed(fields.get("Steps"), int),
        guidance_scale=_parsed(fields.get("CFG scale"), float),
        scheduler=fields.get("Sampler") or None,
        strength=None if second_pass else _parsed(fields.get("Denoising strength"), float),
        seed=saved.seed,
        loras=tuple(LoraChoice(name, weight) for name, weight in weights if weight is not None),
    )


def _parsed(text: str | None, kind: Callable[[str], _T]) -> _T | None:
    """`text` as a `kind`; None when it is missing or damaged (the model's default, then)."""
    try:
        return None if text is None else kind(text)
    except ValueError:
        return None


class LostJobs:
    """The session's jobs whose results are still to be fetched from the daemon's list."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._jobs: dict[str, LostJob] = {}
        self._looks = 0  # since the last reconnection: spaces the next look

    def __bool__(self) -> bool:
        return bool(self._jobs)

    @property
    def ids(self) -> frozenset[str]:
        return frozenset(self._jobs)

    def add(self, job: str, settings: Settings, plan: JobPlan, where: Any = None) -> None:
        self._jobs[job] = LostJob(job, settings, plan, where, self._clock())

    def reconnected(self) -> None:
        """A new connection: look at once, then soon again."""
        self._looks = 0

    def next_look_s(self) -> float:
        """How long to wait before the next look at the daemon's list."""
        self._looks += 1
        return min(MAX_LOOK_INTERVAL_S, 2.0 ** (self._looks - 1))

    def found(self, page: ResultsPage) -> list[tuple[LostJob, tuple[SavedResult, ...]]]:
        """The lost jobs whose every image `page` lists, with those results in the job's order;
        they are no longer lost. Jobs lost longer than LOST_FOR_S ago are given up."""
        now = self._clock()
        done = []
        for job in list(self._jobs.values()):
            saved = sorted((s for s in page.results if s.job == job.job), key=lambda s: s.index)
            if len(saved) >= job.settings.num_images:
                done.append((job, tuple(saved)))
            if len(saved) >= job.settings.num_images or now - job.lost_at > LOST_FOR_S:
                del self._jobs[job.job]
        return done
