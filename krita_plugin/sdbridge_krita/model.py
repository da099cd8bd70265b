"""The docker's state and actions, without widgets: what the artist chose, the connection, the
running job. Widgets read it and listen to its signals; it reaches Krita only through
`document.KritaDocument` and the daemon only through `connection.Connection`. What a job's
events mean is `sdbridge.editor.session`'s business, shared with GIMP and the CLI; when live mode
sends and which of its images shows is `sdbridge.editor.live`'s."""

from __future__ import annotations

import itertools
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from krita import Krita
from PyQt5.QtCore import QObject, QTimer, pyqtSignal
from PyQt5.QtGui import QImage

from sdbridge.editor import canvas
from sdbridge.editor.canvas import JobPlan, Placement
from sdbridge.editor.control import (
    DEFAULT_PREPROCESSOR,
    ControlChoice,
    check_controls,
    control_entries,
)
from sdbridge.editor.history import History, HistoryItem, LostJob, LostJobs, result_of
from sdbridge.editor.live import LIVE_STRENGTH, LiveScheduler, Snapshot, live_settings, next_poll_s
from sdbridge.editor.results import ResultsPage, SavedResult
from sdbridge.editor.session import (
    DaemonInfo,
    Generation,
    JobView,
    LoraChoice,
    Phase,
    Result,
    Settings,
    check_settings,
    editor_fields,
    saved_text,
)
from sdbridge.editor.styles import Style, StyleError, load_styles, save_style
from sdbridge.wire.protocol import DEFAULT_ADDRESS, MAX_SEED, ErrorCode

from .connection import Connection
from .document import Capture, DocumentError, KritaDocument

SETTINGS_GROUP = "sdbridge"
PREVIEWS_PER_JOB = 10  # each costs the daemon well under a millisecond


@dataclass
class RunningJob:
    key: str
    document: KritaDocument
    plan: JobPlan
    settings: Settings
    generation: Generation | None = None


@dataclass(frozen=True)
class ControlLayer:
    """A layer that steers the jobs (a ControlNet reads it), by its Krita node's id."""

    layer: str
    choice: ControlChoice


@dataclass(frozen=True)
class LiveJob:
    generation: Generation
    plan: JobPlan
    prompt: str


@dataclass
class LiveRun:
    """Live mode on one document, from switching it on to switching it off."""

    document: KritaDocument
    seed: int  # for every job of the run, unless the artist fixed one
    scheduler: LiveScheduler = field(default_factory=LiveScheduler)
    jobs: dict[int, LiveJob] = field(default_factory=dict)  # by ticket, until each ends
    image: tuple[Placement, str] | None = None  # what shows, and its layer name for Apply


def qimage(image: Mapping[str, Any]) -> QImage:
    """A raw RGBA wire image as a QImage that owns its pixels (copy: the bytes go away)."""
    width, height = image["width"], image["height"]
    return QImage(image["data"], width, height, width * 4, QImage.Format_RGBA8888).copy()


def raw_image(png: Mapping[str, Any]) -> dict[str, Any]:
    """A PNG wire image (what `results` lists) as a raw RGBA one, like a `result`'s."""
    image = QImage.fromData(png["data"], "PNG").convertToFormat(QImage.Format_RGBA8888)
    bits = image.constBits()
    bits.setsize(image.sizeInBytes())  # rows of width * 4 bytes: no padding in RGBA8888
    return {"width": image.width(), "height": image.height(), "format": "raw", "data": bytes(bits)}


class Model(QObject):
    connection_changed = pyqtSignal(bool, str, str)  # connected, message, technical detail
    info_changed = pyqtSignal(object)  # the daemon's DaemonInfo: models, samplers, limits
    running_changed = pyqtSignal(bool)
    progress_changed = pyqtSignal(int, int)  # step, total (0, 0: idle)
    preview_changed = pyqtSignal(QImage)
    message_changed = pyqtSignal(str, bool)  # text, is an error
    last_seed_changed = pyqtSignal(int)
    styles_changed = pyqtSignal(list, str)  # names, the chosen one ("" for none)
    history_changed = pyqtSignal()
    settings_loaded = pyqtSignal()  # the artist's choices changed here: widgets re-read them
    live_changed = pyqtSignal(bool)
    controls_changed = pyqtSignal()
    # A job's new view, from the client's threads to the GUI thread (queued by Qt).
    _view_received = pyqtSignal(str, object)
    _live_view_received = pyqtSignal(object, int, object)  # run, ticket, view

    def __init__(self) -> None:
        super().__init__()
        self.prompt = ""
        self.negative_prompt = ""
        # None: the model's default (the daemon fills it in; few-step models get theirs).
        self.steps: int | None = None
        self.guidance_scale: float | None = None
        self.scheduler: str | None = None
        self.strength = 1.0
        self.refine_strength: float | None = None  # None: no second pass
        self.loras: list[LoraChoice] = []
        self.controls: list[ControlLayer] = []
        self.style = ""  # a name from the styles file; "": none
        self.styles: dict[str, Style] = {}
        self.fixed_seed = False
        self.seed = 0
        self.num_images = 1
        self.model_name = ""
        self.info: DaemonInfo | None = None
        self.address = Krita.instance().readSetting(SETTINGS_GROUP, "address", DEFAULT_ADDRESS)
        self.token = Krita.instance().readSetting(SETTINGS_GROUP, "token", "")
        self.connected = False
        self.last_seed: int | None = None
        self.job: RunningJob | None = None
        self.history = History()
        # By history number: where it goes. An earlier session's image has none: the active one.
        self._documents: dict[int, KritaDocument] = {}
        self._keys = (f"krita-{n}" for n in itertools.count(1))
        self.live: LiveRun | None = None
        self._live_timer = QTimer(self)
        self._live_timer.setSingleShot(True)
        self._live_timer.timeout.connect(self._poll_live)
        self.lost = LostJobs()
        self._look_timer = QTimer(self)
        self._look_timer.setSingleShot(True)
        self._look_timer.timeout.connect(self._look_for_lost)
        self._view_received.connect(self._on_view)
        self._live_view_received.connect(self._on_live_view)
        self._connection = Connection()
        self._connection.state_changed.connect(self._on_state)
        self._connection.info_received.connect(self._on_info)
        self._connection.results_received.connect(self._on_results)
        self._connection.restored.connect(self._on_restored)
        self._connection.set_address(self.address, self.token)

    # --- actions ---------------------------------------------------------------------------------

    def set_address(self, address: str, token: str) -> None:
        """Connect to another daemon and remember it for the next Krita session. The token is
        kept in kritarc like the daemon keeps it in a file: readable by this user only."""
        self.address = address.strip() or DEFAULT_ADDRESS
        self.token = token.strip()
        Krita.instance().writeSetting(SETTINGS_GROUP, "address", self.address)
        Krita.instance().writeSetting(SETTINGS_GROUP, "token", self.token)
        self.connected = False
        self.connection_changed.emit(False, f"Connecting to {self.address} …", "")
        self._connection.set_address(self.address, self.token)

    def chosen(self) -> Settings:
        """What the artist set in the panel, before any style."""
        return Settings(
            prompt=self.prompt,
            negative_prompt=self.negative_prompt,
            model=self.model_name or None,
            num_inference_steps=self.steps,
            guidance_scale=self.guidance_scale,
            scheduler=self.scheduler,
            strength=self.strength,
            seed=self.seed if self.fixed_seed else None,
            num_images=self.num_images,
            loras=tuple(self.loras),
            refine_strength=self.refine_strength,
            preview_every=max(1, self.expected_steps() // PREVIEWS_PER_JOB),
        )

    def settings(self) -> Settings:
        """The job's settings: the panel's, in the chosen style."""
        style = self.styles.get(self.style)
        return style.apply(self.chosen()) if style else self.chosen()

    def load_styles(self) -> None:
        """(Re)reads the styles file, which the GIMP plug-in and the CLI share."""
        try:
            self.styles = load_styles()
        except StyleError as exc:
            self.styles = {}
            self.message_changed.emit(str(exc), True)
        if self.style not in self.styles:
            self.style = ""
        self.styles_changed.emit(list(self.styles), self.style)

    def save_style(self, name: str, prompt: str) -> None:
        """Saves the panel's parameters and negative prompt, with `prompt` (its additions, where
        {prompt} stands for the artist's prompt), as the style `name`, and picks it."""
        name = name.strip()
        if not name:
            return
        try:
            save_style(Style.of(self.chosen(), name, prompt.strip() or "{prompt}"))
        except (OSError, StyleError) as exc:
            self.message_changed.emit(f"Could not save the style: {exc}", True)
            return
        self.style = name
        self.load_styles()
        self.message_changed.emit(f"Saved the style “{name}”.", False)

    def add_lora(self, name: str, weight: float) -> None:
        self.loras = [lora for lora in self.loras if lora.name != name]
        self.loras.append(LoraChoice(name, weight))

    def remove_lora(self, name: str) -> None:
        self.loras = [lora for lora in self.loras if lora.name != name]

    # --- control layers --------------------------------------------------------------------------

    def add_control_layer(self) -> None:
        """A new transparent layer on top to scribble on, steering the jobs where it is drawn."""
        try:
            document = KritaDocument.active()
        except DocumentError as exc:
            self.message_changed.emit(str(exc), True)
            return
        taken = set(document.layer_names().values())
        name = next(f"Control {n}" for n in itertools.count(1) if f"Control {n}" not in taken)
        self._add_control(document.add_control_layer(name))
        self.message_changed.emit(
            f"Draw on “{name}” where the picture should go; it steers every job while shown.",
            False,
        )

    def use_active_layer(self) -> None:
        """The layer the artist works on (a sketch, line art, a photo) steers the jobs."""
        try:
            layer = KritaDocument.active().active_layer()
        except DocumentError as exc:
            self.message_changed.emit(str(exc), True)
            return
        if layer is None:
            self.message_changed.emit("Pick the layer to use as a control first.", True)
        elif all(control.layer != layer for control in self.controls):
            self._add_control(layer)

    def _add_control(self, layer: str) -> None:
        self.controls.append(ControlLayer(layer, ControlChoice(preprocessor=DEFAULT_PREPROCESSOR)))
        self.controls_changed.emit()

    def shown_controls(self) -> list[tuple[int, ControlLayer, str]]:
        """The active image's controls, each with its index and its layer's name as it is now:
        another image's controls come back with that image, a deleted layer's with its undo."""
        try:
            names = KritaDocument.active().layer_names()
        except DocumentError:
            return []
        return [(i, c, names[c.layer]) for i, c in enumerate(self.controls) if c.layer in names]

    def set_control(self, index: int, **changes: Any) -> None:
        """Changes a control's ControlChoice fields (`model`, `preprocessor`, `strength`)."""
        control = self.controls[index]
        self.controls[index] = replace(control, choice=replace(control.choice, **changes))

    def remove_control(self, index: int) -> None:
        del self.controls[index]
        self.controls_changed.emit()

    def _control_fields(self, document: KritaDocument, plan: JobPlan) -> list[dict[str, Any]]:
        """The `control` entries of a job over `plan` on `document`: its shown control layers
        (another image's, or a deleted one, steer nothing). DocumentError: what stops them."""
        pairs = []
        for control in self.controls:
            rgba = document.control_pixels(control.layer, plan.bounds)
            if rgba is not None:
                pairs.append((control.choice, rgba))
        if not pairs:
            return []
        assert self.info is not None  # connected: the daemon said hello
        problem = check_controls([choice for choice, _ in pairs], self.info)
        if problem:
            raise DocumentError(problem)
        return control_entries(pairs, plan)

    def _capture(self, document: KritaDocument) -> tuple[Capture, list[dict[str, Any]]]:
        """What a job reads of the document: its canvas and its controls."""
        capture = document.capture(self.strength, [control.layer for control in self.controls])
        return capture, self._control_fields(document, capture.plan)

    def expected_steps(self) -> int:
        """The steps the job will run: the artist's, else the model's default."""
        defaults = self.info.defaults_for(self.model_name) if self.info else None
        return self.steps or (defaults.num_inference_steps if defaults else 20)

    def generate(self) -> None:
        if self.job is not None:
            return
        if not self.connected:
            self.message_changed.emit(
                f"Not connected to the sdbridge daemon at {self.address}. "
                "Start it with `sdbridge serve`; the plugin connects by itself.",
                True,
            )
            return
        settings = self.settings()
        problem = check_settings(settings, self.info)
        if problem:
            self.message_changed.emit(problem, True)
            return
        try:
            document = KritaDocument.active()
            capture, control = self._capture(document)
        except DocumentError as exc:
            self.message_changed.emit(str(exc), True)
            return
        fields = editor_fields(settings, capture.plan, capture.rgba, control=control)
        job = RunningJob(next(self._keys), document, capture.plan, settings)
        generation = self._connection.submit(
            fields, lambda view, key=job.key: self._view_received.emit(key, view)
        )
        if generation is None:
            self.message_changed.emit(f"Not connected to the daemon at {self.address}.", True)
            return
        job.generation = generation
        self.job = job
        self.running_changed.emit(True)
        self.progress_changed.emit(0, self.expected_steps())
        self.message_changed.emit(generation.view.message, False)

    def cancel(self) -> None:
        """Asks the daemon to stop; after session.CANCEL_GRACE_S without an answer the job is
        left behind, so a hung daemon never keeps Generate disabled."""
        if self.job is not None and self.job.generation is not None:
            self.job.generation.cancel()

    def reuse_last_seed(self) -> None:
        if self.last_seed is not None:
            self.fixed_seed = True
            self.seed = self.last_seed

    # --- live mode -------------------------------------------------------------------------------

    def set_live(self, on: bool) -> None:
        """Live mode on the active document: every change to it (debounced) sends a live job
        whose image shows on the live layer; off: the live layer goes and its job stops."""
        if on == (self.live is not None):
            return
        if on:
            self._start_live()
        else:
            self._stop_live()

    def _start_live(self) -> None:
        try:
            document = KritaDocument.active()
        except DocumentError as exc:
            self.message_changed.emit(str(exc), True)
            self.live_changed.emit(False)
            return
        if self.strength >= 1.0:
            self.strength = LIVE_STRENGTH
            self.settings_loaded.emit()
        document.start_live()
        self.live = LiveRun(document, random.randint(0, MAX_SEED))
        self.live_changed.emit(True)
        self.message_changed.emit("Live: paint, and the image follows.", False)
        self._live_timer.start(0)

    def _stop_live(self) -> None:
        run, self.live = self.live, None
        self._live_timer.stop()
        for job in list(run.jobs.values()):
            job.generation.cancel()  # each still ends, cancelled, on the live view path
        if run.document.is_open:
            run.document.stop_live()
        self.live_changed.emit(False)
        self.message_changed.emit("", False)

    def apply_live(self) -> None:
        """Adds the live image as a layer of the artist's, named like any result."""
        run = self.live
        if run is None or run.image is None:
            self.message_changed.emit("Nothing to apply yet: the live image comes first.", True)
            return
        placement, name = run.image
        run.document.add_layer(placement, name)
        self.message_changed.emit(f"Added {name}.", False)

    def _poll_live(self) -> None:
        """Looks at the canvas; sends a live job when it changed and then held still."""
        run = self.live
        if run is None:
            return
        if not run.document.is_open:
            self._stop_live()
            return
        started = time.perf_counter()
        defaults = self.info.defaults_for(self.model_name) if self.info else None
        snapshot = Snapshot(
            run.document.layer_states(),
            run.document.selection_state(),
            live_settings(self.settings(), defaults, run.seed),
            tuple((control.layer, control.choice) for control in self.controls),
        )
        cost = time.perf_counter() - started
        if self.connected and run.scheduler.observe(snapshot, time.monotonic()):
            self._send_live(run, snapshot)
        self._live_timer.start(round(next_poll_s(cost) * 1000))

    def _send_live(self, run: LiveRun, snapshot: Snapshot) -> None:
        ticket = run.scheduler.sent(snapshot)  # a failure here waits for the next change
        settings = snapshot.settings
        problem = check_settings(settings, self.info)
        if problem:
            self.message_changed.emit(problem, True)
            return
        try:
            capture, control = self._capture(run.document)
        except DocumentError as exc:
            self.message_changed.emit(str(exc), True)
            return
        fields = editor_fields(settings, capture.plan, capture.rgba, live=True, control=control)
        generation = self._connection.submit(
            fields, lambda view: self._live_view_received.emit(run, ticket, view)
        )
        if generation is not None:
            run.jobs[ticket] = LiveJob(generation, capture.plan, settings.prompt)

    def _on_live_view(self, run: LiveRun, ticket: int, view: JobView) -> None:
        if not view.done:
            return
        job = run.jobs.pop(ticket)
        if run is not self.live or not run.document.is_open:
            return  # switched off since, or the image closed (the next poll switches it off)
        if view.is_error:
            self.message_changed.emit(view.message, True)
        if view.phase is not Phase.FINISHED or not run.scheduler.land(ticket):
            return
        image = view.result.images[0]
        try:
            placement = canvas.place_result(dict(image.image), job.plan)
        except ValueError as exc:
            self.message_changed.emit(f"Could not place the live image: {exc}", True)
            return
        run.document.show_live(placement)
        run.image = (placement, canvas.layer_name(job.prompt, image.seed))
        self.preview_changed.emit(qimage(image.image))

    # --- news from the connection and the job (GUI thread, via queued signals) -------------------

    def _on_state(self, connected: bool, text: str, detail: str) -> None:
        self.connected = connected
        self.connection_changed.emit(connected, text, detail)

    def _on_info(self, info: DaemonInfo) -> None:
        self.info = info
        if self.model_name not in info.models:
            self.model_name = info.model
        self.loras = [lora for lora in self.loras if lora.name in info.loras]
        self.info_changed.emit(info)
        text = f"Connected to {self.address}: {info.model} on {info.device}"
        self.connection_changed.emit(True, text, f"sdbridge daemon {info.server}")
        if self.live is not None and "live" not in info.capabilities:
            self._stop_live()  # another daemon now, an older one
        # Connected again (info follows every connection): the lost jobs may be done by now.
        self.lost.reconnected()
        self._look_for_lost()

    def _look_for_lost(self) -> None:
        if self.lost and self.info is not None and "results" in self.info.capabilities:
            self._connection.look_for(self.lost.ids)

    def _on_results(self, page: ResultsPage | None) -> None:
        for job, saved in self.lost.found(page) if page is not None else ():
            self._recovered(job, saved)
        if self.lost:  # still running on the daemon, perhaps: look again later
            self._look_timer.start(round(self.lost.next_look_s() * 1000))

    def _recovered(self, job: LostJob, saved: tuple[SavedResult, ...]) -> None:
        """A lost job's images, found among the daemon's saved results: into the history,
        where they can be applied where the job would have put them."""
        kept = [entry for entry in saved if entry.image is not None]  # a PNG moved away: gone
        if not kept:
            return
        result = result_of(kept, [raw_image(entry.image) for entry in kept])
        self._remember(job.settings, job.plan, result, job.where)
        self.message_changed.emit(
            f"The lost job “{job.settings.prompt}” finished after all: its image is in the "
            f"history; press Apply to add it. {saved_text(result)}",
            False,
        )

    def _on_restored(self, address: str, found: tuple[SavedResult, ...]) -> None:
        """The artist's newest results on this daemon (an earlier Krita's, GIMP's, the CLI's):
        into the history, after this run's images; nothing is added to the canvas."""
        items = self.history.restore(found, raw_image)
        if not items:
            return
        self.history_changed.emit()
        self.message_changed.emit(
            f"{len(items)} of your earlier images from {address} "
            f"{'is' if len(items) == 1 else 'are'} back in the history, after this session's: "
            "click one to see it, Apply adds it at the top left of the image.",
            False,
        )

    def _on_view(self, key: str, view: JobView) -> None:
        job = self.job
        if job is None or key != job.key:
            return  # a late view of a job the artist already left behind
        if view.phase is Phase.RUNNING and view.total:
            self.progress_changed.emit(view.step, view.total)
        if view.preview is not None:
            self.preview_changed.emit(qimage(dict(view.preview.image)))
        if not view.done:
            self.message_changed.emit(view.message, view.is_error)
            return
        self.job = None
        self.running_changed.emit(False)
        self.progress_changed.emit(0, 0)
        if view.phase is Phase.FINISHED and view.result is not None:
            self._apply(job, view.result, view.message)
        elif self._lost(job, view):
            self.message_changed.emit(
                f"{view.message} If the daemon finishes the job, its image joins the history "
                "once the plugin is connected again.",
                True,
            )
        else:
            self.message_changed.emit(view.message, view.is_error)

    def _lost(self, job: RunningJob, view: JobView) -> bool:
        """Keeps a job the lost connection cut off: the daemon runs a started job to its end
        and lists its images; those of a queued one it drops, so nothing is found for it."""
        sent = job.generation.job if job.generation is not None else None
        if sent is None or view.failure is None or view.failure.code != ErrorCode.CONNECTION_LOST:
            return False
        self.lost.add(sent.id, job.settings, job.plan, job.document)
        return True  # the first look comes with the next connection's info

    def _remember(
        self, settings: Settings, plan: JobPlan, result: Result, document: KritaDocument
    ) -> list[HistoryItem]:
        """A job's images into the history, with the document they go to."""
        items = self.history.add(settings, plan, result)
        # Where each kept image goes; the history forgets its oldest, and so does this.
        kept = {item.number for item in self.history}
        self._documents = {n: doc for n, doc in self._documents.items() if n in kept}
        for item in items:
            self._documents[item.number] = document
        self.history_changed.emit()
        self.last_seed = items[0].seed
        self.last_seed_changed.emit(items[0].seed)
        self.preview_changed.emit(qimage(items[0].image))
        return items

    def _apply(self, job: RunningJob, result: Result, saved: str) -> None:
        """One image lands as a layer at once; several are picked from the history."""
        items = self._remember(job.settings, job.plan, result, job.document)
        if not job.document.is_open:
            self.message_changed.emit(f"The image was closed; nothing was added. {saved}", True)
            return
        if len(items) > 1:
            self.show_item(items[0].number)
            self.message_changed.emit(
                f"{len(items)} images: pick one in the history and press Apply. {saved}",
                result.warning is not None,
            )
            return
        self.apply_item(items[0].number, saved, result.warning is not None)

    # --- the history -----------------------------------------------------------------------------

    def _placed(self, number: int) -> tuple[HistoryItem, KritaDocument, Placement] | None:
        item = self.history.get(number)
        if item is None:  # the strip is redrawn whenever the history changes
            return None
        try:
            document = self._documents.get(number) or KritaDocument.active()
            if not document.is_open:
                raise DocumentError("That image's document is closed.")
            # The artist may have converted it since, or it is any image (an earlier session's).
            document.check_rgba8()
            return item, document, canvas.place_result(dict(item.image), item.plan)
        except DocumentError as exc:
            self.message_changed.emit(str(exc), True)
        except ValueError as exc:
            self.message_changed.emit(f"Could not place the result: {exc}", True)
        return None

    def show_item(self, number: int) -> None:
        """Shows a history image on the canvas where it was painted (an earlier session's: at the
        active image's top left), on a preview layer."""
        placed = self._placed(number)
        if placed is not None:
            item, document, placement = placed
            document.show_preview(placement)
            self.preview_changed.emit(qimage(dict(item.image)))

    def apply_item(self, number: int, saved: str = "", warned: bool = False) -> None:
        """Adds a history image as a layer where it was painted (an earlier session's: at the
        active image's top left; the preview goes away).
        `saved`: where the daemon keeps its copy, `warned`: when it could not keep one."""
        placed = self._placed(number)
        if placed is None:
            return
        item, document, placement = placed
        name = canvas.layer_name(item.settings.prompt, item.seed)
        document.add_layer(placement, name)
        self.message_changed.emit(f"Added {name}. {saved}".strip(), warned)

    def use_item_settings(self, number: int) -> None:
        """Loads a history image's prompt, seed and parameters back into the panel."""
        item = self.history.get(number)
        if item is None:
            return
        s = item.settings
        self.prompt, self.negative_prompt = s.prompt, s.negative_prompt
        self.model_name = s.model or self.model_name
        self.steps, self.guidance_scale, self.scheduler = (
            s.num_inference_steps,
            s.guidance_scale,
            s.scheduler,
        )
        self.strength = 1.0 if s.strength is None else s.strength
        self.loras = list(s.loras)
        self.refine_strength = s.refine_strength
        self.fixed_seed, self.seed = True, item.seed
        self.settings_loaded.emit()
