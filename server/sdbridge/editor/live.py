"""Live painting: while it is on, every change to the canvas sends an img2img job of it and the
newest result shows over the artist's layers, until Apply makes it a layer of its own.

What a front-end must decide, without an editor: when a change is worth a job (a cheap
fingerprint of the layers, a short debounce so that a stroke still being drawn sends nothing),
which result may show (only the newest job's: one made before the latest change is stale), and
what a live job asks for (few steps, one image, no previews). The daemon does the rest: a newer
live job on the same connection supersedes the one before it (`live` in `request_fields`).

Pure Python: it runs inside Krita and GIMP.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, replace

from .control import ControlChoice
from .session import ModelDefaults, Settings

# How often the editor looks for a change, at least. Reading the layers' pixels is the cost
# (0.5 ms for a 512x384 layer, 4 ms for 1600x1200 in Krita): on a large canvas the polls space
# out so that they take at most POLL_SHARE of the editor's time.
POLL_S = 0.025
POLL_SHARE = 0.1
# A change must hold this long before it is sent: a stroke being drawn changes the layers at
# every poll, and reading the canvas for a job on the editor's thread (50 ms for 1600x1200)
# would make the brush lag.
DEBOUNCE_S = 0.04
# A model whose own default is more steps than this runs this many in live mode (the artist's
# own choice of steps still counts): img2img runs strength x steps of them.
LIVE_STEPS = 4
# Live mode at strength 100 % would ignore the canvas; switching it on starts here instead.
LIVE_STRENGTH = 0.5


@dataclass(frozen=True)
class LayerState:
    """What of one layer decides a live job's input; equal states paint the same."""

    id: str
    visible: bool
    opacity: int
    blending: str
    pixels: int  # crc32 of its pixels (0 for a hidden layer: they do not show)

    @classmethod
    def of(
        cls, id: str, visible: bool, opacity: int, blending: str, pixels: bytes | None
    ) -> LayerState:
        return cls(id, visible, opacity, blending, zlib.crc32(pixels) if visible and pixels else 0)


@dataclass(frozen=True)
class Snapshot:
    """Everything a live job depends on: a change to any of it is worth a new job."""

    layers: tuple[LayerState, ...]  # bottom to top, sdbridge's own layers left out
    selection: int | None  # crc32 of the selection's bounds and mask; None: no selection
    settings: Settings
    # The control layers by layer id, with how each steers (their pixels are in `layers`).
    controls: tuple[tuple[str, ControlChoice], ...] = ()


def selection_state(x: int, y: int, width: int, height: int, mask: bytes) -> int:
    return zlib.crc32(mask, zlib.crc32(f"{x},{y},{width},{height}".encode()))


def live_settings(settings: Settings, defaults: ModelDefaults | None, seed: int) -> Settings:
    """A live job's settings: the artist's, with one image, no previews and no second pass
    (each costs time and only the final image shows), `seed` unless the artist fixed one (a
    new seed per stroke would repaint the whole picture at every stroke), and few steps."""
    steps = settings.num_inference_steps
    if steps is None and (defaults is None or defaults.num_inference_steps > LIVE_STEPS):
        steps = LIVE_STEPS
    return replace(
        settings,
        num_inference_steps=steps,
        seed=seed if settings.seed is None else settings.seed,
        num_images=1,
        refine_strength=None,
        preview_every=0,
    )


def next_poll_s(cost_s: float) -> float:
    """The wait before the next look for a change, after one that took `cost_s`."""
    return max(POLL_S, cost_s * (1 - POLL_SHARE) / POLL_SHARE)


class LiveScheduler:
    """When a live job goes out and which result shows. Jobs are numbered (tickets) in the
    order they are sent; the caller passes the time, so tests need no clock."""

    def __init__(self, debounce_s: float = DEBOUNCE_S) -> None:
        self.debounce_s = debounce_s
        self._seen: Snapshot | None = None
        self._seen_since = 0.0
        self._sent: Snapshot | None = None
        self._tickets = 0
        self._shown = 0  # the ticket whose result shows; 0: none yet

    def observe(self, snapshot: Snapshot, now: float) -> bool:
        """Records what the canvas looks like at `now`; True when a job of it should go out
        (it differs from the last one sent and has held still for the debounce)."""
        if snapshot != self._seen:
            self._seen, self._seen_since = snapshot, now
        return snapshot != self._sent and now - self._seen_since >= self.debounce_s

    def sent(self, snapshot: Snapshot) -> int:
        """A job of `snapshot` goes out (or failed to: it is not retried until the next
        change); returns its ticket."""
        self._sent = snapshot
        self._tickets += 1
        return self._tickets

    def land(self, ticket: int) -> bool:
        """Whether the result of job `ticket` shows; True records it as showing. Only the
        newest job's does: a job sent since was for a canvas that has changed again."""
        if ticket != self._tickets or ticket <= self._shown:
            return False
        self._shown = ticket
        return True
