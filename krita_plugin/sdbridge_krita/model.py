"""The docker's state and actions, without widgets: what the artist chose, the connection, the
running job. Widgets read it and listen to its signals; it reaches Krita only through
`document.KritaDocument` and the daemon only through `connection.Connection`. What a job's
events mean is `sdbridge.editor.session`'s business, shared with GIMP and the CLI."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

from krita import Krita
from PyQt5.QtCore import QObject, pyqtSignal
from PyQt5.QtGui import QImage

from sdbridge.editor import canvas
from sdbridge.editor.canvas import JobPlan, Placement
from sdbridge.editor.history import History, HistoryItem
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
)
from sdbridge.editor.styles import Style, StyleError, load_styles, save_style
from sdbridge.wire.protocol import DEFAULT_ADDRESS

from .connection import Connection
from .document import DocumentError, KritaDocument

SETTINGS_GROUP = "sdbridge"
PREVIEWS_PER_JOB = 10  # each costs the daemon well under a millisecond


@dataclass
class RunningJob:
    key: str
    document: KritaDocument
    plan: JobPlan
    settings: Settings
    generation: Generation | None = None


def qimage(image: dict[str, Any]) -> QImage:
    """A raw RGBA wire image as a QImage that owns its pixels (copy: the bytes go away)."""
    width, height = image["width"], image["height"]
    return QImage(image["data"], width, height, width * 4, QImage.Format_RGBA8888).copy()


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
    # A job's new view, from the client's threads to the GUI thread (queued by Qt).
    _view_received = pyqtSignal(str, object)

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
        self._documents: dict[int, KritaDocument | None] = {}  # by history number: where it goes
        self._keys = (f"krita-{n}" for n in itertools.count(1))
        self._view_received.connect(self._on_view)
        self._connection = Connection()
        self._connection.state_changed.connect(self._on_state)
        self._connection.info_received.connect(self._on_info)
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
            capture = document.capture(self.strength)
        except DocumentError as exc:
            self.message_changed.emit(str(exc), True)
            return
        fields = editor_fields(settings, capture.plan, capture.rgba)
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
        else:
            self.message_changed.emit(view.message, view.is_error)

    def _apply(self, job: RunningJob, result: Result, saved: str) -> None:
        """One image lands as a layer at once; several are picked from the history."""
        items = self.history.add(job.settings, job.plan, result)
        # Where each kept image goes; the history forgets its oldest, and so does this.
        self._documents = {item.number: self._documents.get(item.number) for item in self.history}
        for item in items:
            self._documents[item.number] = job.document
        self.history_changed.emit()
        self.last_seed = items[0].seed
        self.last_seed_changed.emit(items[0].seed)
        self.preview_changed.emit(qimage(dict(items[0].image)))
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
        document = self._documents.get(number)
        if item is None or document is None or not document.is_open:
            self.message_changed.emit("That image's document is closed.", True)
            return None
        try:
            return item, document, canvas.place_result(dict(item.image), item.plan)
        except ValueError as exc:
            self.message_changed.emit(f"Could not place the result: {exc}", True)
            return None

    def show_item(self, number: int) -> None:
        """Shows a history image on the canvas where it was painted, on a preview layer."""
        placed = self._placed(number)
        if placed is not None:
            item, document, placement = placed
            document.show_preview(placement)
            self.preview_changed.emit(qimage(dict(item.image)))

    def apply_item(self, number: int, saved: str = "", warned: bool = False) -> None:
        """Adds a history image as a layer where it was painted (the preview goes away).
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
