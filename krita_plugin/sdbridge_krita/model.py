"""The docker's state and actions, without widgets: what the artist chose, the connection, the
running job. Widgets read it and listen to its signals; it reaches Krita only through
`document.KritaDocument` and the daemon only through `connection.Connection`."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

from krita import Krita
from PyQt5.QtCore import QObject, pyqtSignal
from PyQt5.QtGui import QImage

from sdbridge.editor import canvas
from sdbridge.editor.canvas import JobPlan, Settings
from sdbridge.wire.protocol import DEFAULT_ADDRESS, MAX_SEED, ErrorCode

from .connection import Connection
from .document import DocumentError, KritaDocument

SETTINGS_GROUP = "sdbridge"

# What the artist reads when a job fails, by protocol error code; others show the daemon's text.
PLAIN_ERRORS = {
    ErrorCode.CONNECTION_LOST: "The sdbridge daemon went away (stopped or restarted) during "
    "the job. The plugin reconnects by itself; press Generate again once it is back.",
    ErrorCode.OUT_OF_MEMORY: "The daemon ran out of memory. Try a smaller selection or image, "
    "or fewer images at once.",
    ErrorCode.BUSY: "The daemon's queue is full. Try again in a moment.",
    ErrorCode.UNKNOWN_MODEL: "The daemon does not have that model any more; pick another one.",
}


@dataclass
class RunningJob:
    key: str
    document: KritaDocument
    plan: JobPlan
    settings: Settings
    cancelling: bool = False


def qimage(image: dict[str, Any]) -> QImage:
    """A raw RGBA wire image as a QImage that owns its pixels (copy: the bytes go away)."""
    width, height = image["width"], image["height"]
    return QImage(image["data"], width, height, width * 4, QImage.Format_RGBA8888).copy()


class Model(QObject):
    connection_changed = pyqtSignal(bool, str, str)  # connected, message, technical detail
    models_changed = pyqtSignal(list, str)  # names, the loaded one
    running_changed = pyqtSignal(bool)
    progress_changed = pyqtSignal(int, int)  # step, total (0, 0: idle)
    preview_changed = pyqtSignal(QImage)
    message_changed = pyqtSignal(str, bool)  # text, is an error
    last_seed_changed = pyqtSignal(int)

    def __init__(self) -> None:
        super().__init__()
        self.prompt = ""
        self.negative_prompt = ""
        self.steps = 20
        self.guidance_scale = 7.5
        self.strength = 1.0
        self.fixed_seed = False
        self.seed = 0
        self.num_images = 1
        self.model_name = ""
        self.address = Krita.instance().readSetting(SETTINGS_GROUP, "address", DEFAULT_ADDRESS)
        self.token = Krita.instance().readSetting(SETTINGS_GROUP, "token", "")
        self.connected = False
        self.last_seed: int | None = None
        self.job: RunningJob | None = None
        self._keys = (f"krita-{n}" for n in itertools.count(1))
        self._connection = Connection()
        self._connection.state_changed.connect(self._on_state)
        self._connection.hello_received.connect(self._on_hello)
        self._connection.job_event.connect(self._on_job_event)
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

    def settings(self) -> Settings:
        return Settings(
            prompt=self.prompt,
            negative_prompt=self.negative_prompt,
            steps=self.steps,
            guidance_scale=self.guidance_scale,
            strength=self.strength,
            seed=self.seed if self.fixed_seed else None,
            num_images=self.num_images,
            model=self.model_name or None,
            # A handful of previews per job: each costs the daemon well under a millisecond.
            preview_every=max(1, self.steps // 10),
        )

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
        if not self.prompt.strip():
            self.message_changed.emit("Type a prompt first.", True)
            return
        if self.fixed_seed and not 0 <= self.seed <= MAX_SEED:
            self.message_changed.emit(f"The seed must be between 0 and {MAX_SEED}.", True)
            return
        settings = self.settings()
        try:
            document = KritaDocument.active()
            capture = document.capture(needs_pixels=settings.strength < 1.0)
        except DocumentError as exc:
            self.message_changed.emit(str(exc), True)
            return
        fields = canvas.generate_fields(settings, capture.plan, capture.rgba)
        self.job = RunningJob(next(self._keys), document, capture.plan, settings)
        self.running_changed.emit(True)
        self.progress_changed.emit(0, settings.steps)
        self.message_changed.emit("Sending the job …", False)
        self._connection.generate(self.job.key, fields)

    def cancel(self) -> None:
        if self.job is not None:
            self.job.cancelling = True
            self.message_changed.emit("Cancelling …", False)
            self._connection.cancel(self.job.key)

    def reuse_last_seed(self) -> None:
        if self.last_seed is not None:
            self.fixed_seed = True
            self.seed = self.last_seed

    # --- news from the connection (GUI thread, via queued signals) -------------------------------

    def _on_state(self, connected: bool, text: str, detail: str) -> None:
        self.connected = connected
        self.connection_changed.emit(connected, text, detail)

    def _on_hello(self, hello: dict[str, Any]) -> None:
        models = [str(m) for m in hello.get("models") or [hello.get("model", "")]]
        loaded = str(hello.get("model", ""))
        if self.model_name not in models:
            self.model_name = loaded
        self.models_changed.emit(models, self.model_name)
        text = f"Connected to {self.address}: {loaded} on {hello.get('device', '?')}"
        self.connection_changed.emit(True, text, f"sdbridge daemon {hello.get('server', '?')}")

    def _on_job_event(self, key: str, event: dict[str, Any]) -> None:
        job = self.job
        if job is None or key != job.key:
            return  # a late event of a job the artist already left behind
        kind = event.get("event")
        if kind == "accepted":
            position = int(event.get("position", 0))
            text = "Starting …" if position == 0 else f"Queued behind {position} job(s) …"
            self.message_changed.emit(text, False)
        elif kind == "started":
            self.message_changed.emit("Generating …", False)
        elif kind == "progress":
            self.progress_changed.emit(int(event["step"]), int(event["total"]))
        elif kind == "preview":
            self.preview_changed.emit(qimage(event["image"]))
        elif kind == "result" and job.cancelling:
            # It finished before the cancel arrived: the artist asked for nothing to be added.
            self._finish()
            self.message_changed.emit("Cancelled; nothing was added.", False)
        elif kind == "result":
            self._finish()
            self._apply(job, event)
        elif kind == "cancelled" and job.cancelling:
            self._finish()
            self.message_changed.emit("Cancelled; nothing was added.", False)
        elif kind == "cancelled":
            # Nobody here asked: the daemon cancels its jobs when it shuts down.
            self._finish()
            self.message_changed.emit(
                "The daemon stopped this job before it finished (it may be shutting down); "
                "nothing was added.",
                True,
            )
        elif kind == "error":
            self._finish()
            code = str(event.get("code", ""))
            text = PLAIN_ERRORS.get(code) or f"The daemon refused the job: {event.get('message')}"
            self.message_changed.emit(text, True)

    def _finish(self) -> None:
        self.job = None
        self.running_changed.emit(False)
        self.progress_changed.emit(0, 0)

    def _apply(self, job: RunningJob, event: dict[str, Any]) -> None:
        images = event.get("images") or []
        seeds = [int(image["seed"]) for image in images]
        if not images:
            self.message_changed.emit("The daemon sent no image.", True)
            return
        self.last_seed = seeds[0]
        self.last_seed_changed.emit(seeds[0])
        self.preview_changed.emit(qimage(images[0]))
        unsaved = canvas.unsaved_warning(event)
        saved = unsaved or f"Saved as {images[0]['path']}."
        if not job.document.is_open:
            self.message_changed.emit(f"The image was closed; nothing was added. {saved}", True)
            return
        try:
            placements = [canvas.place_result(image, job.plan) for image in images]
        except ValueError as exc:
            self.message_changed.emit(f"Could not place the result: {exc}", True)
            return
        names = [canvas.layer_name(job.settings.prompt, seed) for seed in seeds]
        group = f"{names[0]} ×{len(names)}"
        job.document.add_layers(placements, names, group)
        added = names[0] if len(names) == 1 else f"{len(names)} layers in '{group}'"
        self.message_changed.emit(f"Added {added}. {saved}", unsaved is not None)
