"""The daemon's saved results as a front-end lists them: what a lost connection or a restarted
editor gets back with the `results` op.

Pure Python: it runs inside Krita and GIMP.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class SavedResult:
    """One image the daemon saved, newest numbers last."""

    number: int  # the daemon's, counting up within its run: page back with `before`
    job: str  # the `generate` request's id
    index: int  # its place among the job's images
    created: float  # Unix time
    prompt: str
    negative_prompt: str
    model: str
    seed: int
    width: int
    height: int
    parameters: str  # the A1111 text
    path: str | None  # the saved PNG; None when it could not be saved
    thumbnail: Mapping[str, Any]  # a PNG wire image, at most 128 px a side
    image: Mapping[str, Any] | None  # the PNG wire image, when asked for and still on disk
    # Made by this connection or one with its session key (a daemon without a token lists
    # everyone's results: these are the front-end's own).
    mine: bool = False

    @classmethod
    def from_dict(cls, entry: Mapping[str, Any]) -> SavedResult:
        return cls(
            number=int(entry["number"]),
            job=str(entry["job"]),
            index=int(entry.get("index", 0)),
            created=float(entry.get("created", 0.0)),
            prompt=str(entry.get("prompt", "")),
            negative_prompt=str(entry.get("negative_prompt", "")),
            model=str(entry.get("model", "")),
            seed=int(entry["seed"]),
            width=int(entry["width"]),
            height=int(entry["height"]),
            parameters=str(entry.get("parameters", "")),
            path=entry.get("path"),
            thumbnail=entry["thumbnail"],
            image=entry.get("image"),
            mine=entry.get("mine") is True,
        )

    @property
    def label(self) -> str:
        """One line for a list: the prompt and the seed."""
        prompt = " ".join(self.prompt.split())
        short = prompt if len(prompt) <= 60 else prompt[:59] + "…"
        return f"{short} (seed {self.seed}, {self.width}x{self.height})"


@dataclass(frozen=True)
class ResultsPage:
    results: tuple[SavedResult, ...]  # newest first
    more: bool  # older ones exist: ask again with `before` the last one's number

    @classmethod
    def from_event(cls, event: Mapping[str, Any]) -> ResultsPage:
        entries = tuple(SavedResult.from_dict(entry) for entry in event.get("results", ()))
        return cls(entries, bool(event.get("more", False)))
