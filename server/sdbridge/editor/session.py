"""The editor session: what every front-end (the Krita docker, the GIMP plug-in, the CLI) does
with the daemon, written once.

- `Settings`: what the artist chose. A field left `None` is not sent, so the daemon fills in
  the model's own defaults (few-step models get their 4 steps and guidance 0).
- `DaemonInfo`: the daemon's models, samplers, per-model defaults and limits, from `hello` and
  `models`, for the widgets' choices and ranges.
- Typed events: one frozen dataclass per event kind, parsed from the wire in one place.
- `JobView` and `advance`: the one mapping from events to what a front-end shows (phase,
  status line, progress, preview, result or error).
- `Session` and `Generation`: one connection and one job, with a Cancel that gives up after a
  bounded wait, so a daemon that never answers cannot trap the artist.

Pure Python (standard library and `sdbridge.wire`): it runs inside Krita and GIMP. Callbacks
come on the client's threads; each front-end hands them to its own UI thread.
"""

from __future__ import annotations

import enum
import queue
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypeAlias

from ..wire.client import Client, ClientError, Job, Link, resolve_address
from ..wire.protocol import MAX_GUIDANCE, MAX_SEED, ErrorCode, Limits
from .canvas import JobPlan, image_map, mask_to_rgba
from .results import ResultsPage

# How long Cancel waits for the daemon's `cancelled` before the front-end lets go of the job.
CANCEL_GRACE_S = 5.0


# --- what the artist asks for ---------------------------------------------------------------


@dataclass(frozen=True)
class LoraChoice:
    name: str
    weight: float = 1.0


def parse_lora(spec: str) -> LoraChoice:
    """`NAME` or `NAME:WEIGHT` (a name may hold colons: the weight is after the last one)."""
    name, _, weight = spec.strip().rpartition(":")
    try:
        return LoraChoice(name.strip(), float(weight)) if name else LoraChoice(spec.strip())
    except ValueError:
        return LoraChoice(spec.strip())


def parse_loras(text: str) -> tuple[LoraChoice, ...]:
    """`ink:0.7, paper` as LoRA choices: the text form of the GIMP argument and the CLI."""
    return tuple(parse_lora(spec) for spec in text.split(",") if spec.strip())


@dataclass(frozen=True)
class Settings:
    """A job's parameters as the artist set them; `None`: the model's default (not sent)."""

    prompt: str
    negative_prompt: str = ""
    model: str | None = None  # None: the daemon's most recently used model
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    scheduler: str | None = None
    strength: float | None = None  # None: 1 without an init image, the daemon's 0.75 with one
    seed: int | None = None  # None: the daemon picks one and reports it
    num_images: int = 1
    loras: tuple[LoraChoice, ...] = ()
    refine_strength: float | None = None
    preview_every: int = 0  # 0: no previews


def check_settings(settings: Settings, info: DaemonInfo | None = None) -> str | None:
    """What is wrong with `settings` in a sentence for the artist, or None. The daemon checks
    everything again; this only saves a round trip for the mistakes a panel can make."""
    if not settings.prompt.strip():
        return "Type a prompt first."
    if settings.seed is not None and not 0 <= settings.seed <= MAX_SEED:
        return f"The seed must be between 0 and {MAX_SEED}."
    if settings.guidance_scale is not None and not 0 <= settings.guidance_scale <= MAX_GUIDANCE:
        return f"The guidance must be between 0 and {MAX_GUIDANCE:g}."
    if info is not None:
        limits = info.limits
        if len(settings.prompt) > limits.max_prompt_chars:
            return f"The prompt is longer than the daemon's {limits.max_prompt_chars} characters."
        steps = settings.num_inference_steps
        if steps is not None and not 1 <= steps <= limits.max_steps:
            return f"The steps must be between 1 and {limits.max_steps}."
        if not 1 <= settings.num_images <= limits.max_images:
            return f"The daemon makes 1 to {limits.max_images} images at once."
        if settings.model and settings.model not in info.models:
            return f"The daemon has no model “{settings.model}”; pick one from the list."
        unknown = [lora.name for lora in settings.loras if lora.name not in info.loras]
        if unknown:
            listed = ", ".join(info.loras) or "none"
            return f"The daemon has no LoRA “{unknown[0]}”; its LoRAs: {listed}."
    return None


def request_fields(
    settings: Settings,
    width: int | None = None,
    height: int | None = None,
    init_image: Mapping[str, Any] | None = None,
    mask_image: Mapping[str, Any] | None = None,
    exact_size: bool = False,
    live: bool = False,
    control: Sequence[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """The fields of a `generate` request (without v/op/id): exactly what was set. `live`: the
    connection's live job, superseding its previous one; neither saved nor listed. `control`:
    the `control` entries (`ControlChoice.entry`)."""
    fields: dict[str, Any] = {"prompt": settings.prompt}
    optional: dict[str, Any] = {
        "negative_prompt": settings.negative_prompt or None,
        "model": settings.model or None,
        "num_inference_steps": settings.num_inference_steps,
        "guidance_scale": _float(settings.guidance_scale),
        "scheduler": settings.scheduler or None,
        "seed": settings.seed,
        "num_images": settings.num_images if settings.num_images != 1 else None,
        "refine_strength": _float(settings.refine_strength),
        "preview_every": settings.preview_every or None,
        "width": width,
        "height": height,
        "init_image": dict(init_image) if init_image is not None else None,
        "mask_image": dict(mask_image) if mask_image is not None else None,
    }
    optional["strength"] = _float(settings.strength)
    fields.update((name, value) for name, value in optional.items() if value is not None)
    if settings.loras:
        fields["loras"] = [{"name": lora.name, "weight": lora.weight} for lora in settings.loras]
    if exact_size:
        fields["exact_size"] = True
    if live:
        fields["live"] = True
    if control:
        fields["control"] = [dict(entry) for entry in control]
    return fields


def _float(value: float | None) -> float | None:
    # msgpack keeps Python's int/float apart; the protocol takes either, logs read better as one.
    return None if value is None else float(value)


def sends_canvas(settings: Settings, plan: JobPlan) -> bool:
    """Whether the job needs the canvas's pixels (`editor_fields`'s `rgba`): read them only then."""
    return plan.needs_canvas(1.0 if settings.strength is None else settings.strength)


def editor_fields(
    settings: Settings,
    plan: JobPlan,
    rgba: bytes | bytearray | None,
    live: bool = False,
    control: Sequence[Mapping[str, Any]] = (),
) -> dict:
    """A `generate` request for a region of an editor's canvas (`live` and `control`: see
    `request_fields`; `control.control_entries` makes the entries over the plan's region).

    `rgba` is the canvas's merged image over `plan.bounds`. It travels as the init image when
    strength < 1 (repaint what is there) and whenever the plan inpaints a selection: inpainting
    needs it for the surroundings even at strength 1, where the selection is painted afresh.
    """
    strength = 1.0 if settings.strength is None else settings.strength
    init = mask = None
    if sends_canvas(settings, plan):
        if rgba is None:
            raise ValueError("the canvas pixels are needed for strength < 1 or a selection")
        init = image_map(plan.bounds.extent, rgba)
    if plan.inpaints:
        mask = image_map(plan.bounds.extent, mask_to_rgba(plan.mask))
    # Without an init image the job paints from scratch: strength means nothing then.
    settings = replace(settings, strength=strength if init is not None else None)
    return request_fields(
        settings, plan.bounds.width, plan.bounds.height, init, mask, live=live, control=control
    )


# --- what the daemon offers ------------------------------------------------------------------


@dataclass(frozen=True)
class ModelDefaults:
    num_inference_steps: int
    guidance_scale: float
    scheduler: str | None  # None: the model's own

    def describe(self) -> str:
        """`4 steps, guidance 0`, for a tooltip or the "model default" text."""
        sampler = f", {self.scheduler}" if self.scheduler else ""
        return f"{self.num_inference_steps} steps, guidance {self.guidance_scale:g}{sampler}"


@dataclass(frozen=True)
class DaemonInfo:
    """The daemon as `hello` (and, when asked, `models`) describe it."""

    server: str
    device: str
    model: str  # the most recently used model: what a job without `model` runs on
    models: tuple[str, ...]
    schedulers: tuple[str, ...]
    loras: tuple[str, ...]
    capabilities: frozenset[str]
    limits: Limits
    defaults: Mapping[str, ModelDefaults] = field(default_factory=dict)  # by model name
    controlnets: tuple[str, ...] = ()
    preprocessors: tuple[str, ...] = ()

    @staticmethod
    def from_events(
        hello: Mapping[str, Any], models: Mapping[str, Any] | None = None
    ) -> DaemonInfo:
        known = Limits().to_dict()
        given = hello.get("limits") or {}
        # Limits a newer daemon adds are ignored; ones it leaves out keep our defaults.
        limits = Limits(**{k: int(v) for k, v in given.items() if k in known})
        defaults = {}
        for entry in (models or {}).get("models") or []:
            values = entry.get("defaults")
            if values:
                defaults[str(entry["name"])] = ModelDefaults(
                    int(values["num_inference_steps"]),
                    float(values["guidance_scale"]),
                    values.get("scheduler"),
                )
        return DaemonInfo(
            server=str(hello.get("server", "?")),
            device=str(hello.get("device", "?")),
            model=str(hello.get("model", "")),
            models=tuple(str(m) for m in hello.get("models") or [hello.get("model", "")]),
            schedulers=tuple(str(s) for s in hello.get("schedulers") or []),
            loras=tuple(str(name) for name in hello.get("loras") or []),
            capabilities=frozenset(str(c) for c in hello.get("capabilities") or []),
            limits=limits,
            defaults=defaults,
            controlnets=tuple(str(name) for name in hello.get("controlnets") or []),
            preprocessors=tuple(str(name) for name in hello.get("preprocessors") or []),
        )

    def defaults_for(self, model: str | None) -> ModelDefaults | None:
        return self.defaults.get(model or self.model)


# --- the events of a job, typed ----------------------------------------------------------------


@dataclass(frozen=True)
class Accepted:
    position: int  # 0: runs next or now


@dataclass(frozen=True)
class Started:
    pass


@dataclass(frozen=True)
class Loading:
    model: str


@dataclass(frozen=True)
class Progress:
    step: int
    total: int
    eta: float


@dataclass(frozen=True)
class Preview:
    step: int
    total: int
    image: Mapping[str, Any]  # a raw wire image, 1/8 of the generation size


@dataclass(frozen=True)
class ResultImage:
    image: Mapping[str, Any]  # the wire image map (`width`, `height`, `format`, `data`)
    seed: int
    path: str | None  # the daemon's saved copy; None when it could not save it
    parameters: str  # the A1111 text


@dataclass(frozen=True)
class Result:
    images: tuple[ResultImage, ...]
    elapsed: float
    warning: str | None  # set when the daemon could not save an image


@dataclass(frozen=True)
class Failed:
    code: str
    message: str
    field: str | None = None


@dataclass(frozen=True)
class Cancelled:
    # `client`, `superseded` (a newer live job), `shutdown`, or `abandoned` (the daemon never
    # confirmed a cancel)
    reason: str


JobEvent: TypeAlias = (
    Accepted | Started | Loading | Progress | Preview | Result | Failed | Cancelled
)


def parse_event(event: Mapping[str, Any]) -> JobEvent | None:
    """A job's event from the wire as its dataclass; None for a kind this version does not know
    (a newer daemon may add some: a front-end ignores them)."""
    kind = event.get("event")
    if kind == "accepted":
        return Accepted(int(event.get("position", 0)))
    if kind == "started":
        return Started()
    if kind == "loading":
        return Loading(str(event.get("model", "")))
    if kind == "progress":
        return Progress(int(event["step"]), int(event["total"]), float(event.get("eta", 0.0)))
    if kind == "preview":
        return Preview(int(event["step"]), int(event["total"]), event["image"])
    if kind == "result":
        images = tuple(
            ResultImage(image, int(image["seed"]), image.get("path"), image.get("parameters", ""))
            for image in event.get("images") or []
        )
        return Result(images, float(event.get("elapsed", 0.0)), event.get("warning"))
    if kind == "error":
        return Failed(
            str(event.get("code", ErrorCode.INTERNAL)),
            str(event.get("message", "")),
            event.get("field"),
        )
    if kind == "cancelled":
        return Cancelled(str(event.get("reason", "")))
    return None


# --- from events to what a front-end shows -----------------------------------------------------


class Phase(enum.Enum):
    SENDING = "sending"
    QUEUED = "queued"
    LOADING = "loading"
    RUNNING = "running"
    FINISHED = "finished"  # `result` holds the images
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def done(self) -> bool:
        return self in (Phase.FINISHED, Phase.FAILED, Phase.CANCELLED)


# What the artist reads when a job fails, by protocol error code; others show the daemon's text.
PLAIN_ERRORS = {
    ErrorCode.CONNECTION_LOST: "The connection to the sdbridge daemon was lost during the job "
    "(it stopped or restarted, or the network dropped). The plugin reconnects by itself; an "
    "image the daemon saved is listed in its recent results.",
    ErrorCode.OUT_OF_MEMORY: "The daemon ran out of memory. Try a smaller selection or image, "
    "or fewer images at once.",
    ErrorCode.BUSY: "The daemon's queue is full. Try again in a moment.",
    ErrorCode.UNKNOWN_MODEL: "The daemon does not have that model any more; pick another one.",
    ErrorCode.UNAUTHORIZED: "The daemon did not accept the token; check it and connect again.",
}
NOTHING_ADDED = "Cancelled; nothing was added."


@dataclass(frozen=True)
class JobView:
    """Everything a front-end shows about one job."""

    phase: Phase = Phase.SENDING
    message: str = "Sending the job …"
    is_error: bool = False
    step: int = 0
    total: int = 0  # 0: not known yet
    eta: float = 0.0
    preview: Preview | None = None
    result: Result | None = None
    failure: Failed | None = None  # the daemon's own words, for a log or a terminal
    cancelling: bool = False

    @property
    def done(self) -> bool:
        return self.phase.done


def advance(view: JobView, event: JobEvent | None) -> JobView:
    """The view after `event`. Once done, a view never changes (late events are ignored)."""
    if view.done or event is None:
        return view
    if isinstance(event, Accepted):
        if event.position == 0:
            return replace(view, phase=Phase.QUEUED, message="Starting …")
        text = f"Queued behind {event.position} job(s) …"
        return replace(view, phase=Phase.QUEUED, message=text)
    if isinstance(event, Started):
        return replace(view, phase=Phase.RUNNING, message="Generating …")
    if isinstance(event, Loading):
        return replace(view, phase=Phase.LOADING, message=f"Loading model {event.model} …")
    if isinstance(event, Progress):
        text = f"Step {event.step}/{event.total}, {event.eta:.0f} s left"
        return replace(
            view,
            phase=Phase.RUNNING,
            message="Cancelling …" if view.cancelling else text,
            step=event.step,
            total=event.total,
            eta=event.eta,
        )
    if isinstance(event, Preview):
        return replace(view, preview=event)
    if isinstance(event, Result) and view.cancelling:
        # It finished before the cancel arrived: the artist asked for nothing to be added.
        return replace(view, phase=Phase.CANCELLED, message=NOTHING_ADDED)
    if isinstance(event, Result) and not event.images:
        return replace(view, phase=Phase.FAILED, message="The daemon sent no image.", is_error=True)
    if isinstance(event, Result):
        return replace(view, phase=Phase.FINISHED, message=saved_text(event), result=event)
    if isinstance(event, Cancelled):
        return replace(view, phase=Phase.CANCELLED, **_cancelled_text(event, view.cancelling))
    if isinstance(event, Failed):
        return replace(
            view, phase=Phase.FAILED, message=failure_text(event), is_error=True, failure=event
        )
    raise TypeError(f"not a job event: {event!r}")


NOT_SENT_CANCELLED = JobView(Phase.CANCELLED, NOTHING_ADDED)


def start_cancelling(view: JobView) -> JobView:
    return view if view.done else replace(view, cancelling=True, message="Cancelling …")


def saved_text(result: Result) -> str:
    """Where the daemon keeps its copy, or why it has none."""
    if result.warning:
        return f"The daemon's own copy was {result.warning}."
    return f"Saved as {result.images[0].path}."


def failure_text(event: Failed) -> str:
    plain = PLAIN_ERRORS.get(event.code)
    if plain:
        return plain
    where = f" ({event.field})" if event.field else ""
    return f"The daemon refused the job: {event.message}{where}"


def _cancelled_text(event: Cancelled, asked: bool) -> dict[str, Any]:
    if event.reason == "abandoned":
        text = (
            f"The daemon did not confirm the cancel within {CANCEL_GRACE_S:g} s; the job was "
            "left behind and nothing will be added."
        )
        return {"message": text, "is_error": True}
    if asked:
        return {"message": NOTHING_ADDED}
    if event.reason == "superseded":
        return {"message": "A newer live job took this one's place."}
    # Nobody here asked: the daemon cancels its jobs when it shuts down.
    text = (
        "The daemon stopped this job before it finished (it may be shutting down); "
        "nothing was added."
    )
    return {"message": text, "is_error": True}


# --- the connection, in words ------------------------------------------------------------------


LINK_TEXTS = {
    Link.CONNECTING: "Connecting to {address} …",
    Link.CONNECTED: "Connected to {address}",
    Link.UNREACHABLE: "No sdbridge daemon at {address}. Start it with `sdbridge serve`; "
    "the plugin keeps trying.",
    Link.FULL: "The daemon at {address} has too many connections open; the plugin keeps trying.",
    Link.TOKEN_REFUSED: "The daemon at {address} did not accept the token; check it and press "
    "Connect.",
    Link.TOKEN_REQUIRED: "The daemon at {address} needs a token: type it and press Connect.",
    Link.TOKEN_UNEXPECTED: "The daemon at {address} takes no token (it listens on loopback only).",
    Link.CLOSED: "Disconnected from {address}.",
}


def link_text(link: Link, address: str) -> str:
    """The connection's state as a sentence for the artist."""
    return LINK_TEXTS[link].format(address=address)


# --- one connection and its jobs ---------------------------------------------------------------

# (the state, a sentence for the artist, the client's technical detail)
LinkCallback: TypeAlias = Callable[[Link, str, str], None]
ViewCallback: TypeAlias = Callable[["JobView"], None]


class Session:
    """One front-end's connection to the daemon.

    Constructing it connects (blocking up to a few seconds for a peer that stalls); `info()`
    waits for the daemon's answers, so neither belongs on a UI thread. `on_link(link, sentence,
    detail)` is called each time the connection's state changes, from the client's threads.
    """

    def __init__(
        self,
        address: str | None = None,
        token: str | None = None,
        client_name: str = "sdbridge-editor",
        on_link: LinkCallback | None = None,
        timeout: float = 10.0,
        session_key: str | None = None,
    ) -> None:
        """`session_key` (`config.session_key()`): `results` then lists this artist's results
        from earlier connections and other editors too."""
        self._on_link = on_link
        self.address = resolve_address(address)
        # Raises ValueError for an address that is not tcp://HOST:PORT.
        self.client = Client(
            self.address,
            timeout=timeout,
            client_name=client_name,
            on_link=self._link_changed,
            token=token or None,
            session=session_key,
        )

    @property
    def link(self) -> Link:
        return self.client.link

    @property
    def link_text(self) -> str:
        return link_text(self.client.link, self.address)

    def _link_changed(self, link: Link, detail: str) -> None:
        if self._on_link is not None:
            self._on_link(link, link_text(link, self.address), detail)

    def info(self, with_models: bool = True) -> DaemonInfo:
        """`hello` (and `models`, for the per-model defaults); raises `ClientError`."""
        hello = self.client.hello()
        models = (
            self.client.models()
            if with_models and "models" in hello.get("capabilities", [])
            else None
        )
        return DaemonInfo.from_events(hello, models)

    def results(
        self, before: int | None = None, limit: int | None = None, images: bool = False
    ) -> ResultsPage:
        """A page of the daemon's saved results this session may see, newest first; raises
        `ClientError` (a daemon without the `results` capability: `unknown_op`)."""
        return ResultsPage.from_event(self.client.results(before, limit, images))

    def submit(self, fields: Mapping[str, Any], on_view: ViewCallback | None = None) -> Generation:
        """Sends a `generate` request and returns at once; never raises for the daemon's sake:
        a refusal or a lost connection is the generation's FAILED view."""
        return Generation(self.client, dict(fields), on_view)

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


class Generation:
    """One job as a front-end follows it: its latest `view`, every change handed to `on_view`
    (on the client's threads) and kept for `views()` (on the caller's).

    Nothing here blocks its caller: the request is sent on a thread of its own (a large canvas
    to a daemon that stopped reading could take long), and so is a cancel.
    """

    def __init__(self, client: Client, fields: dict[str, Any], on_view: ViewCallback | None):
        self._lock = threading.Lock()
        self._view = JobView()
        self._on_view = on_view
        self._changes: queue.SimpleQueue[JobView] = queue.SimpleQueue()
        self._timer: threading.Timer | None = None
        self.job: Job | None = None
        threading.Thread(
            target=self._send, args=(client, fields), name="sdbridge-send", daemon=True
        ).start()

    @property
    def view(self) -> JobView:
        with self._lock:
            return self._view

    def cancel(self, grace: float = CANCEL_GRACE_S) -> None:
        """Asks the daemon to stop; if it has not ended the job `grace` seconds later, the job
        is given up here (a `Cancelled("abandoned")` view) so the artist can go on."""
        with self._lock:
            if self._view.done or self._view.cancelling:
                return
            self._view = view = start_cancelling(self._view)
            self._timer = threading.Timer(grace, self._apply, (Cancelled("abandoned"),))
            self._timer.daemon = True
            self._timer.start()
            job = self.job  # None while sending: `_send` cancels it once it is out
        self._publish(view)
        if job is not None:
            threading.Thread(target=job.cancel, name="sdbridge-cancel", daemon=True).start()

    def views(self, timeout: float | None = None, poll: float | None = None) -> Iterator[JobView]:
        """Each change of the view until it is done. With `poll`, also yields the unchanged
        view every `poll` seconds (GIMP handles its dialog's clicks then). Raises
        `TimeoutError` after `timeout` seconds without the job ending."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise TimeoutError(f"no result within {timeout:g} s")
            wait = remaining if poll is None else min(poll, remaining or poll)
            try:
                view = self._changes.get(timeout=wait)
            except queue.Empty:
                view = self.view
            yield view
            if view.done:
                return

    def _send(self, client: Client, fields: dict[str, Any]) -> None:
        try:
            job = client.generate(**fields)
        except ClientError as exc:  # not connected, or a request over the daemon's size limit
            sent = JobView(Phase.FAILED, f"The job was not sent: {exc.message}.", True)
            self._settle(lambda view: NOT_SENT_CANCELLED if view.cancelling else sent)
            return
        with self._lock:
            self.job = job
            cancelling = self._view.cancelling
        job.subscribe(lambda event: self._apply(parse_event(event)))
        if cancelling:
            job.cancel()

    def _apply(self, event: JobEvent | None) -> None:
        self._settle(lambda view: advance(view, event))

    def _settle(self, change: Callable[[JobView], JobView]) -> None:
        with self._lock:
            before = self._view
            if before.done:
                return
            self._view = view = change(before)
            if view.done and self._timer is not None:
                self._timer.cancel()
        if view is not before:
            self._publish(view)

    def _publish(self, view: JobView) -> None:
        self._changes.put(view)
        if self._on_view is not None:
            self._on_view(view)
