#!/usr/bin/env python3
"""sdbridge for GIMP 3: Filters > sdbridge > Generate..., Repaint selection..., Expand... and
Recent results...

The first three send the image (or selection) to a running `sdbridge serve` daemon and put the
result on a new layer; Recent results puts one the daemon saved earlier on a new layer. The
requests, the placement rules and the results' listing come from `sdbridge.editor`, shared
with the Krita plugin; this file only reads and writes GIMP's pixels and drives the UI.
`sdbridge install gimp` puts the pure-Python sdbridge modules and msgpack in `vendor/` here.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import html
import json
import os
import queue
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

import gi

gi.require_version("Gimp", "3.0")
gi.require_version("GimpUi", "3.0")
gi.require_version("Gegl", "0.4")
gi.require_version("Gtk", "3.0")
gi.require_version("GdkPixbuf", "2.0")
from gi.repository import GdkPixbuf, Gegl, Gimp, GimpUi, GLib, GObject, Gtk  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "vendor"))
try:
    from sdbridge import __version__
    from sdbridge.editor import canvas
    from sdbridge.editor.config import session_key
    from sdbridge.editor.control import (
        KINDS,
        ControlChoice,
        check_controls,
        control_entries,
    )
    from sdbridge.editor.recent import (
        NoSuchResult,
        RecentError,
        details,
        fetch_result,
        list_results,
    )
    from sdbridge.editor.results import ResultsPage, SavedResult
    from sdbridge.editor.session import (
        DaemonInfo,
        Generation,
        JobView,
        Phase,
        Preview,
        Session,
        Settings,
        check_settings,
        editor_fields,
        parse_loras,
        sends_canvas,
    )
    from sdbridge.editor.styles import Style, StyleError, load_styles, styles_path
    from sdbridge.wire.client import ClientError
    from sdbridge.wire.protocol import (
        ADDRESS_ENV,
        DEFAULT_ADDRESS,
        MAX_CONTROL_STRENGTH,
        MAX_GUIDANCE,
        MAX_SEED,
    )

    IMPORT_ERROR = ""
except ImportError as exc:  # still register, so the menu entry can say what is wrong
    IMPORT_ERROR = (
        f"the sdbridge client modules are missing ({exc}); "
        "reinstall the plug-in with `sdbridge install gimp`"
    )
    __version__ = "?"
    # The wire's ranges and control kinds, to register all the same
    MAX_GUIDANCE, MAX_SEED, MAX_CONTROL_STRENGTH = 30.0, 2**32 - 1, 2.0
    KINDS = {"scribble": "Scribble"}

PLUG_IN_BINARY = "sdbridge_gimp"
CLIENT_NAME = f"sdbridge-gimp/{__version__}"
GENERATE = "python-fu-sdbridge-generate"
REPAINT = "python-fu-sdbridge-repaint-selection"
EXPAND = "python-fu-sdbridge-expand"
RECENT = "python-fu-sdbridge-recent"
MARGINS = ("left", "top", "right", "bottom")
MAX_MARGIN = 4096
MENU = "<Image>/Filters/sdbridge"
SETTINGS_FILE = "sdbridge.json"  # in the GIMP profile: the address both procedures share
RGBA = "R'G'B'A u8"  # the wire's 8-bit RGBA; babl converts from any image precision
MASK = "Y u8"
HELLO_TIMEOUT = 10.0  # a daemon that accepts but never answers must not hang GIMP
# The parameter dialog opens after at most this long without the daemon's ranges.
PROBE_WAIT = 1.5
# A job past its timeout: how long the daemon has to confirm the cancel before we let go.
TIMEOUT_CANCEL_GRACE = 1.0
PREVIEW_SIDE = 192  # px, the longer side of the live preview in the progress window
POLL_INTERVAL = 0.05  # how often the progress dialog handles clicks while waiting
# The steps argument's own range; the daemon's limits.max_steps is checked before sending.
MAX_STEPS_ARGUMENT = 10_000
MAX_IMAGES_ARGUMENT = 64  # the daemon's limits.max_images decides; the dialog shows it
# Recent results: a page with one full-size PNG may take a while on a slow link; a daemon that
# never answers lets go after this.
RESULTS_TIMEOUT = 30.0
THUMBNAIL_SIDE = 96  # px, the longer side of a result in the Recent results list
T = TypeVar("T")


class PluginError(Exception):
    """Ends the procedure with `status` and this text as the PDB error message."""

    def __init__(self, message: str, status: Gimp.PDBStatusType) -> None:
        super().__init__(message)
        self.status = status


class Cancelled(Exception):
    pass


def calling_error(message: str) -> PluginError:
    return PluginError(f"sdbridge: {message}", Gimp.PDBStatusType.CALLING_ERROR)


def execution_error(message: str) -> PluginError:
    return PluginError(f"sdbridge: {message}", Gimp.PDBStatusType.EXECUTION_ERROR)


# --- the daemon address, shared by both procedures and kept between runs ---------------------


def settings_path() -> str:
    return os.path.join(Gimp.directory(), SETTINGS_FILE)


def saved_address() -> str:
    """The address from the last dialog, else $SDBRIDGE_ADDRESS, else the default."""
    try:
        with open(settings_path(), encoding="utf-8") as f:
            address = json.load(f).get("address")
    except (OSError, ValueError, AttributeError):
        address = None
    return address or os.environ.get(ADDRESS_ENV) or DEFAULT_ADDRESS


def save_address(address: str) -> None:
    try:
        with open(settings_path(), "w", encoding="utf-8") as f:
            json.dump({"address": address}, f)
    except OSError as exc:  # losing the setting must not lose the picture
        print(f"sdbridge: cannot save the address in {settings_path()}: {exc}", file=sys.stderr)


# --- reading and writing GIMP's pixels --------------------------------------------------------


def selection_bounds(image: Gimp.Image) -> canvas.Bounds | None:
    _, non_empty, x1, y1, x2, y2 = Gimp.Selection.bounds(image)
    return canvas.Bounds.from_corners(x1, y1, x2, y2) if non_empty else None


def read_buffer(drawable: Gimp.Drawable, bounds: canvas.Bounds, pixel_format: str) -> bytes:
    rect = Gegl.Rectangle.new(bounds.x, bounds.y, bounds.width, bounds.height)
    return bytes(drawable.get_buffer().get(rect, 1.0, pixel_format, Gegl.AbyssPolicy.NONE))


def visible_pixels(
    image: Gimp.Image, bounds: canvas.Bounds, hidden: Gimp.Drawable | None = None
) -> bytes:
    """What the user sees (all visible layers merged) over `bounds`, as RGBA; without `hidden`
    (the control layer: it steers the job, it is no part of the picture)."""
    shown = hidden is not None and hidden.get_visible()
    if shown:
        image.undo_freeze()  # hiding it for a moment is no step for the user to undo
        hidden.set_visible(False)
    try:
        merged = Gimp.Layer.new_from_visible(image, image, "sdbridge source")
    finally:
        if shown:
            hidden.set_visible(True)
            image.undo_thaw()
    try:
        return read_buffer(merged, bounds, RGBA)
    finally:
        merged.delete()


def drawable_pixels(drawable: Gimp.Drawable, bounds: canvas.Bounds) -> bytes:
    """A drawable's own pixels over `bounds` (image coordinates; transparent past its edges),
    as RGBA."""
    _, x, y = drawable.get_offsets()
    own = canvas.Bounds(bounds.x - x, bounds.y - y, bounds.width, bounds.height)
    return read_buffer(drawable, own, RGBA)


def add_result_layer(
    image: Gimp.Image, drawables: list[Gimp.Drawable], placement: canvas.Placement, name: str
) -> Gimp.Layer:
    """A new layer with the result above the active layer, in one undo step."""
    box = placement.bounds
    kind = (
        Gimp.ImageType.GRAYA_IMAGE
        if image.get_base_type() == Gimp.ImageBaseType.GRAY
        else Gimp.ImageType.RGBA_IMAGE
    )
    image.undo_group_start()
    try:
        layer = Gimp.Layer.new(
            image, name, box.width, box.height, kind, 100.0, Gimp.LayerMode.NORMAL
        )
        buffer = layer.get_buffer()
        buffer.set(Gegl.Rectangle.new(0, 0, box.width, box.height), RGBA, bytes(placement.rgba))
        buffer.flush()
        above = next((d for d in drawables if isinstance(d, Gimp.Layer)), None)
        if above is None:
            image.insert_layer(layer, None, 0)
        else:
            image.insert_layer(layer, above.get_parent(), image.get_item_position(above))
        layer.set_offsets(box.x, box.y)
        layer.update(0, 0, box.width, box.height)
    finally:
        image.undo_group_end()
    return layer


# --- talking to the daemon ----------------------------------------------------------------------


class ProgressDialog:
    """Step count, the daemon's live preview and a Cancel button while it works (runs from
    the menu only)."""

    def __init__(self, title: str) -> None:
        self.cancel_requested = False
        self.dialog = GimpUi.Dialog(title=title, role=PLUG_IN_BINARY)
        self.dialog.add_button("_Cancel", Gtk.ResponseType.CANCEL)
        self.dialog.connect("response", self._on_cancel)
        self.dialog.connect("delete-event", self._on_cancel)
        self.label = Gtk.Label(label="Connecting to the sdbridge daemon …")
        self.bar = Gtk.ProgressBar()
        self.preview = Gtk.Image()
        self._shown_preview: Preview | None = None
        box = self.dialog.get_content_area()
        box.set_spacing(8)
        box.set_border_width(12)
        box.pack_start(self.preview, False, False, 0)
        box.pack_start(self.label, False, False, 0)
        box.pack_start(self.bar, False, False, 0)
        self.dialog.show_all()

    def _on_cancel(self, *_args: Any) -> bool:
        self.cancel_requested = True
        return True  # keep the window until the job has ended

    def show(self, view: JobView, fraction: float | None) -> None:
        self.label.set_text(view.message)
        if fraction is not None:
            self.bar.set_fraction(fraction)
        if view.preview is not None and view.preview is not self._shown_preview:
            self._shown_preview = view.preview
            self.show_preview(view.preview.image)

    def show_preview(self, image: Mapping[str, Any]) -> None:
        """A preview is 1/8 of the generation size: shown enlarged to PREVIEW_SIDE."""
        width, height = image["width"], image["height"]
        pixbuf = GdkPixbuf.Pixbuf.new_from_bytes(
            GLib.Bytes.new(image["data"]),
            GdkPixbuf.Colorspace.RGB,
            True,
            8,
            width,
            height,
            width * 4,
        )
        self.preview.set_from_pixbuf(fit(pixbuf, PREVIEW_SIDE))

    def pump(self) -> None:
        while Gtk.events_pending():
            Gtk.main_iteration()

    def close(self) -> None:
        self.dialog.destroy()
        self.pump()


def fit(pixbuf: GdkPixbuf.Pixbuf, side: int) -> GdkPixbuf.Pixbuf:
    """`pixbuf` scaled so that its longer side is `side` px."""
    width, height = pixbuf.get_width(), pixbuf.get_height()
    scale = side / max(width, height)
    return pixbuf.scale_simple(
        max(1, round(width * scale)), max(1, round(height * scale)), GdkPixbuf.InterpType.BILINEAR
    )


def off_thread(
    call: Callable[[], T], dialog: ProgressDialog | None = None, wait: float | None = None
) -> T:
    """`call()` on a thread of its own while GIMP's thread keeps the dialog alive: its Cancel
    raises `Cancelled` at once, and so a daemon that never answers cannot trap the artist.
    Raises TimeoutError after `wait` seconds, and whatever `call` raised."""
    outcome: queue.SimpleQueue[tuple[bool, Any]] = queue.SimpleQueue()

    def work() -> None:
        try:
            outcome.put((True, call()))
        except Exception as exc:
            outcome.put((False, exc))

    threading.Thread(target=work, name="sdbridge-gimp", daemon=True).start()
    deadline = None if wait is None else time.monotonic() + wait
    while True:
        if dialog is not None:
            dialog.pump()
            if dialog.cancel_requested:
                raise Cancelled()
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            raise TimeoutError(f"no answer within {wait:g} s")
        try:
            ok, value = outcome.get(timeout=min(POLL_INTERVAL, remaining or POLL_INTERVAL))
        except queue.Empty:
            continue
        if ok:
            return value
        raise value


def show_progress(view: JobView, dialog: ProgressDialog | None) -> None:
    fraction = view.step / view.total if view.total else None
    Gimp.progress_set_text(f"sdbridge: {view.message}")
    if fraction is not None:
        Gimp.progress_update(fraction)
    if dialog is not None:
        dialog.show(view, fraction)


def watch(
    generation: Generation, views: Iterable[JobView], dialog: ProgressDialog | None
) -> JobView:
    """Shows each view on GIMP's thread (libgimp calls are not thread-safe) until the last;
    the dialog's Cancel cancels the job, which ends within session.CANCEL_GRACE_S even when
    the daemon never confirms."""
    view, shown = generation.view, None
    for view in views:
        if dialog is not None:
            dialog.pump()
            if dialog.cancel_requested:
                generation.cancel()
        if view is not shown:
            show_progress(view, dialog)
            shown = view
    return view


def follow(
    generation: Generation, address: str, timeout: float, dialog: ProgressDialog | None
) -> JobView:
    """The job's finished view; raises Cancelled or the daemon's failure as a PluginError."""
    try:
        view = watch(generation, generation.views(timeout, POLL_INTERVAL), dialog)
    except TimeoutError:
        generation.cancel(TIMEOUT_CANCEL_GRACE)  # waited for below: the cancel must go out
        watch(generation, generation.views(poll=POLL_INTERVAL), dialog)
        raise execution_error(
            f"no result from the daemon at {address} within {timeout:g} s; the job was cancelled"
        ) from None
    if view.phase is Phase.FINISHED:
        return view
    if view.phase is Phase.CANCELLED and view.cancelling:
        raise Cancelled()
    raise execution_error(view.message)


@dataclasses.dataclass(frozen=True)
class Params:
    settings: Settings
    address: str
    timeout: float
    margins: tuple[int, int, int, int] = (0, 0, 0, 0)  # Expand: left, top, right, bottom
    control_layer: Gimp.Drawable | None = None  # Generate and Repaint: it steers the job
    control: ControlChoice | None = None

    @staticmethod
    def from_config(config: Gimp.ProcedureConfig, mode: Mode) -> Params:
        # Steps, guidance and sampler left at "model default" are not sent: the daemon applies
        # the model's own (a few-step model gets its 4 steps and guidance 0). A random seed is
        # the daemon's to pick; it reports it, and the layer name shows it.
        guidance = config.get_property("guidance")
        settings = Settings(
            prompt=text_property(config, "prompt"),
            negative_prompt=text_property(config, "negative-prompt"),
            model=text_property(config, "model") or None,
            num_inference_steps=config.get_property("steps") or None,
            guidance_scale=guidance if guidance >= 0 else None,
            scheduler=text_property(config, "scheduler") or None,
            strength=config.get_property("strength"),
            seed=None if config.get_property("random-seed") else config.get_property("seed"),
            num_images=config.get_property("images"),
            loras=parse_loras(text_property(config, "loras")),
            refine_strength=config.get_property("refine-strength") or None,
        )
        style = text_property(config, "style")
        control_layer = config.get_property("control") if mode is not Mode.EXPAND else None
        return Params(
            settings=chosen_style(style).apply(settings) if style else settings,
            address=text_property(config, "address") or saved_address(),
            timeout=config.get_property("timeout"),
            margins=(
                tuple(config.get_property(side) for side in MARGINS)
                if mode is Mode.EXPAND
                else (0, 0, 0, 0)
            ),
            control_layer=control_layer,
            control=None
            if control_layer is None
            else ControlChoice(
                model=text_property(config, "control-model"),
                preprocessor=config.get_property("control-kind"),
                strength=config.get_property("control-strength"),
            ),
        )


def chosen_style(name: str) -> Style:
    try:
        styles = load_styles()
    except StyleError as exc:
        raise calling_error(str(exc)) from exc
    if name not in styles:
        known = ", ".join(styles) or "none yet"
        raise calling_error(f"no style “{name}” in {styles_path()} (styles: {known})")
    return styles[name]


def has_property(config: Gimp.ProcedureConfig, name: str) -> bool:
    """Whether the procedure has this argument (Expand has no control)."""
    return any(spec.name == name for spec in config.list_properties())


def text_property(config: Gimp.ProcedureConfig, name: str) -> str:
    # The PDB hands an empty string argument over as None.
    return (config.get_property(name) or "").strip()


class Mode(enum.Enum):
    GENERATE = "generate"  # paint the selection's bounds afresh, keep its shape
    REPAINT = "repaint"  # inpaint the selection
    EXPAND = "expand"  # enlarge the canvas and paint the new margins


def plan(
    image: Gimp.Image, mode: Mode, settings: Settings, control: Gimp.Drawable | None = None
) -> tuple[canvas.JobPlan, bytes | None]:
    """The job's region and mask, and the visible pixels (without the `control` layer) when
    the job sends them. Repaint inpaints the selection; Generate paints its bounds afresh and
    keeps only its shape (both read the selection's mask, so ellipses and feathered edges stay
    as drawn); Expand paints what is transparent, with the picture's edge stretched into it in
    the init image."""
    extent = canvas.Extent(image.get_width(), image.get_height())
    if mode is Mode.EXPAND:
        whole = canvas.Bounds.of(extent)
        visible = visible_pixels(image, whole)
        job_plan = canvas.plan_expand(extent, visible[3::4])
        if job_plan is None:
            raise calling_error("nothing to expand: give a margin, on a picture with content")
        region = canvas.copy_region(visible, whole, job_plan.bounds, 4)
        return job_plan, bytes(canvas.fill_transparent(region, job_plan.bounds.extent))
    selection = selection_bounds(image)
    mask = None if selection is None else read_buffer(image.get_selection(), selection, MASK)
    try:
        planner = canvas.plan_job if mode is Mode.REPAINT else canvas.plan_area
        job_plan = planner(extent, selection, mask)
    except canvas.SelectionOutsideCanvas as exc:
        raise calling_error(str(exc)) from exc
    needed = sends_canvas(settings, job_plan)
    return job_plan, visible_pixels(image, job_plan.bounds, control) if needed else None


def enlarge(image: Gimp.Image, margins: tuple[int, int, int, int]) -> None:
    """Image > Canvas Size by these margins (negative ones undo it); the layers keep their
    size, so the new margins are transparent."""
    left, top, right, bottom = margins
    image.resize(image.get_width() + left + right, image.get_height() + top + bottom, left, top)


def connect(address: str, timeout: float = HELLO_TIMEOUT) -> Session:
    """With this user's session key: on a daemon with a token, its `results` then lists what
    GIMP made to GIMP, Krita and the CLI of the same user."""
    try:
        return Session(address, client_name=CLIENT_NAME, timeout=timeout, session_key=session_key())
    except ValueError as exc:  # not tcp://HOST:PORT
        raise calling_error(str(exc)) from exc


def paint(
    image: Gimp.Image,
    drawables: list[Gimp.Drawable],
    params: Params,
    mode: Mode,
    dialog: ProgressDialog | None,
) -> Gimp.Layer:
    """Expand enlarges the canvas first, in the same undo step as the new layer; if the job
    does not end in a layer the canvas gets its size back."""
    if mode is not Mode.EXPAND:
        return paint_layer(image, drawables, params, mode, dialog)
    if not any(params.margins):
        raise calling_error("give Expand a margin of at least one pixel")
    image.undo_group_start()
    try:
        enlarge(image, params.margins)
        try:
            return paint_layer(image, drawables, params, mode, dialog)
        except BaseException:
            left, top, right, bottom = params.margins
            enlarge(image, (-left, -top, -right, -bottom))
            raise
    finally:
        image.undo_group_end()


def paint_layer(
    image: Gimp.Image,
    drawables: list[Gimp.Drawable],
    params: Params,
    mode: Mode,
    dialog: ProgressDialog | None,
) -> Gimp.Layer:
    settings = params.settings
    if dialog is not None:  # someone is watching: ask for a preview at every step
        settings = dataclasses.replace(settings, preview_every=1)
    Gimp.progress_init(f"sdbridge: {settings.prompt[:60]}")
    control = params.control_layer
    if control is not None and control.get_image() != image:
        raise calling_error("the control layer must be one of the image's own")
    with connect(params.address) as session:
        try:
            info = off_thread(functools.partial(session.info, with_models=False), dialog)
        except ClientError as exc:  # its message names the address and what to do
            raise execution_error(exc.message) from exc
        controls = [] if params.control is None else [params.control]
        problem = check_settings(settings, info) or check_controls(controls, info)
        if problem:
            raise calling_error(problem)
        job_plan, rgba = plan(image, mode, settings, control)
        layers = [(choice, drawable_pixels(control, job_plan.bounds)) for choice in controls]
        entries = control_entries(layers, job_plan)
        generation = session.submit(editor_fields(settings, job_plan, rgba, control=entries))
        view = follow(generation, session.address, params.timeout, dialog)
    assert view.result is not None  # a FINISHED view holds its result
    # Several images: one layer each, the first on top and the others hidden, to pick from by
    # switching them on (image i has seed + i). The first is the procedure's return value.
    # Each goes right above the active layer, so in the job's order they stack top down.
    layers = []
    for image_result in view.result.images:
        placement = canvas.place_result(dict(image_result.image), job_plan)
        name = canvas.layer_name(settings.prompt, image_result.seed)
        layers.append(add_result_layer(image, drawables, placement, name))
        layers[-1].set_visible(len(layers) == 1)
    layer = layers[0]
    Gimp.displays_flush()
    if view.result.warning:  # the layer holds the image; only the daemon's file is missing
        Gimp.message(f"sdbridge: {view.message}")
    return layer


# --- the procedures ------------------------------------------------------------------------------

DIALOG_FIELDS = [
    "prompt-frame",
    "negative-prompt-frame",
    "model",
    "loras",
    "style",
    "steps",
    "guidance",
    "scheduler",
    "random-seed",
    "strength",
    "refine-strength",
    "images",
    "address",
    "timeout",
]
CONTROL_FIELDS = ["control", "control-kind", "control-model", "control-strength"]
MODEL_DEFAULT = "model default"


def dialog_title(procedure: Gimp.Procedure) -> str:
    return "sdbridge: " + procedure.get_menu_label().replace("_", "").rstrip(".")


def probe(address: str) -> DaemonInfo | None:
    """The daemon's models, samplers and limits for the dialog, or None when it is not there
    or does not answer within PROBE_WAIT: the dialog never waits longer on a missing daemon."""

    def ask() -> DaemonInfo:
        with connect(address, PROBE_WAIT) as session:
            return session.info()

    try:
        return off_thread(ask, wait=PROBE_WAIT)
    except (ClientError, PluginError, TimeoutError):
        return None


def show_model_default(spin: GimpUi.LabelSpin, is_default: Callable[[float], bool]) -> None:
    """The value that stands for "the model's default" reads as words, not as 0 or -1."""
    button = spin.get_spin_button()
    button.set_width_chars(len(MODEL_DEFAULT))
    button.set_numeric(False)  # a numeric spin button drops the words as it is given them
    # Words typed over keep the value, where GTK would read them as 0 (guidance 0, not default).
    button.set_update_policy(Gtk.SpinButtonUpdatePolicy.IF_VALID)

    def output(widget: Gtk.SpinButton) -> bool:
        if not is_default(widget.get_value()):
            return False  # GTK formats the number
        widget.set_text(MODEL_DEFAULT)
        return True

    button.connect("output", output)


def offer_names(entry: GimpUi.LabelEntry, names: tuple[str, ...], tooltip: str) -> None:
    """Completes the entry from the daemon's names and lists them in its tooltip."""
    store = Gtk.ListStore(str)
    for name in names:
        store.append([name])
    completion = Gtk.EntryCompletion(model=store, minimum_key_length=0, inline_completion=True)
    completion.set_text_column(0)
    entry.get_entry().set_completion(completion)
    entry.set_tooltip_text(f"{tooltip}: {', '.join(names) or 'none'}")


def apply_offer(
    dialog: GimpUi.ProcedureDialog, config: Gimp.ProcedureConfig, info: DaemonInfo
) -> None:
    """The daemon's ranges and choices: its limits.max_steps bounds the steps."""
    steps = dialog.get_widget("steps", GimpUi.LabelSpin)
    steps.set_property("upper", info.limits.max_steps)
    model = text_property(config, "model") or info.model
    defaults = info.defaults_for(model)
    if defaults is not None:
        steps.set_tooltip_text(f"0: the model's default ({model}: {defaults.describe()})")
    models = f"Empty: its loaded model ({info.model}). The daemon's models"
    offer_names(dialog.get_widget("model", GimpUi.LabelEntry), info.models, models)
    samplers = "Empty: the model's default. The daemon's samplers"
    offer_names(dialog.get_widget("scheduler", GimpUi.LabelEntry), info.schedulers, samplers)
    loras = "name:weight, separated by commas. The daemon's LoRAs"
    offer_names(dialog.get_widget("loras", GimpUi.LabelEntry), info.loras, loras)
    dialog.get_widget("images", GimpUi.LabelSpin).set_property("upper", info.limits.max_images)
    if has_property(config, "control-model"):  # Generate and Repaint
        control = dialog.get_widget("control-model", GimpUi.LabelEntry)
        tooltip = "Empty: the daemon's first for the model. The daemon's ControlNets"
        offer_names(control, info.controlnets, tooltip)


def add_seed_widget(dialog: GimpUi.ProcedureDialog, config: Gimp.ProcedureConfig) -> None:
    """GIMP 3.0's procedure dialog has no widget for a uint argument (it warns and leaves a
    gap), so the seed gets GimpUi's own, below Random seed and usable only when that is off."""
    seed = GimpUi.prop_label_spin_new(config, "seed", 0)
    flags = GObject.BindingFlags.SYNC_CREATE | GObject.BindingFlags.INVERT_BOOLEAN
    config.bind_property("random-seed", seed, "sensitive", flags)
    toggle = dialog.get_widget("random-seed", Gtk.CheckButton)
    box = toggle.get_parent()
    box.pack_start(seed, False, False, 0)
    box.reorder_child(seed, box.child_get_property(toggle, "position") + 1)
    # Size groups merge: this lines its label up with the dialog's own.
    labels = Gtk.SizeGroup(mode=Gtk.SizeGroupMode.HORIZONTAL)
    labels.add_widget(seed.get_label())
    labels.add_widget(dialog.get_widget("steps", GimpUi.LabelSpin).get_label())
    seed.show_all()


def build_dialog(procedure: Gimp.Procedure, config: Gimp.ProcedureConfig) -> GimpUi.Dialog:
    """The parameter dialog (GimpUi.init must have run)."""
    # GIMP restores each procedure's own last values; the address is the one both share.
    config.set_property("address", saved_address())
    # An empty string argument comes back as None, which a text entry refuses.
    for name in ("model", "loras", "style", "scheduler", "control-model"):
        if has_property(config, name):
            config.set_property(name, text_property(config, name))
    dialog = GimpUi.ProcedureDialog.new(procedure, config, dialog_title(procedure))
    # A slider: the default spin box cannot step through a range narrower than 1.
    dialog.get_spin_scale("strength", 1.0)
    # Prompts are often long: multi-line text boxes, titled since a text box has no label.
    for name, title in (("prompt", "_Prompt"), ("negative-prompt", "Negati_ve prompt")):
        view = dialog.get_widget(name, Gtk.TextView)
        view.set_wrap_mode(Gtk.WrapMode.WORD)
        view.set_size_request(360, 60)
        dialog.get_label(f"{name}-title", title, False, True).set_mnemonic_widget(view)
        dialog.fill_frame(f"{name}-frame", f"{name}-title", False, name)
    show_model_default(dialog.get_widget("steps", GimpUi.LabelSpin), lambda v: v < 1)
    show_model_default(dialog.get_widget("guidance", GimpUi.LabelSpin), lambda v: v < 0)
    expands = PROCEDURES[procedure.get_name()][0] is Mode.EXPAND
    margins, controls = (list(MARGINS), []) if expands else ([], CONTROL_FIELDS)
    dialog.fill(
        [*DIALOG_FIELDS[:2], *margins, *DIALOG_FIELDS[2:-2], *controls, *DIALOG_FIELDS[-2:]]
    )
    add_seed_widget(dialog, config)
    info = probe(config.get_property("address"))
    if info is not None:
        apply_offer(dialog, config, info)
    return dialog


def ask(procedure: Gimp.Procedure, config: Gimp.ProcedureConfig) -> None:
    """Shows the parameter dialog; raises Cancelled when the user closes it."""
    parameters = build_dialog(procedure, config)
    accepted = parameters.run()
    parameters.destroy()
    if not accepted:
        raise Cancelled()
    save_address(text_property(config, "address"))


def run(
    procedure: Gimp.Procedure,
    run_mode: Gimp.RunMode,
    image: Gimp.Image,
    drawables: list[Gimp.Drawable],
    config: Gimp.ProcedureConfig,
    _data: Any,
    mode: Mode,
) -> Gimp.ValueArray:
    dialog = None

    def work() -> Gimp.Layer:
        nonlocal dialog
        if run_mode != Gimp.RunMode.NONINTERACTIVE:  # the menu, or Filters > Repeat Last
            GimpUi.init(PLUG_IN_BINARY)
            if run_mode == Gimp.RunMode.INTERACTIVE:
                ask(procedure, config)
            dialog = ProgressDialog(dialog_title(procedure))
        return paint(image, drawables, Params.from_config(config, mode), mode, dialog)

    try:
        return returning_layer(procedure, work)
    finally:
        Gimp.progress_end()
        if dialog is not None:
            dialog.close()


def returning_layer(procedure: Gimp.Procedure, work: Callable[[], Gimp.Layer]) -> Gimp.ValueArray:
    """The procedure's return values: the layer `work` made, or how it failed."""
    try:
        if IMPORT_ERROR:
            raise execution_error(IMPORT_ERROR)
        layer = work()
    except Cancelled:
        return procedure.new_return_values(Gimp.PDBStatusType.CANCEL, GLib.Error())
    except PluginError as exc:
        return procedure.new_return_values(exc.status, GLib.Error(str(exc)))
    except Exception as exc:  # a bug must still end as a PDB error, never a dead plug-in
        traceback.print_exc()
        return procedure.new_return_values(
            Gimp.PDBStatusType.EXECUTION_ERROR, GLib.Error(f"sdbridge: internal error: {exc!r}")
        )
    values = procedure.new_return_values(Gimp.PDBStatusType.SUCCESS, GLib.Error())
    values.remove(1)
    values.insert(1, GObject.Value(Gimp.Layer, layer))
    return values


RW = GObject.ParamFlags.READWRITE

PROCEDURES = {
    GENERATE: (
        Mode.GENERATE,
        "_Generate...",
        "A new layer painted from the prompt by the sdbridge daemon",
        "Sized to the selection's bounds (or the image) and placed there; only the selected "
        "pixels change (a feathered edge blends). With strength < 1 the visible pixels of that "
        "area are the starting point (img2img).",
        1.0,
    ),
    REPAINT: (
        Mode.REPAINT,
        "_Repaint selection...",
        "Repaints the selection with the sdbridge daemon (img2img / inpainting)",
        "Sends the visible pixels around the selection and the selection as the mask; the "
        "result is a new layer on which only the selected pixels are opaque. Without a "
        "selection the whole image is repainted. Strength: how much changes (1 = all).",
        0.75,
    ),
    EXPAND: (
        Mode.EXPAND,
        "_Expand...",
        "Enlarges the canvas by the given margins and paints them with the sdbridge daemon",
        "Image > Canvas Size and a fill in one step: the daemon sees the picture next to the "
        "new margins and paints them; the picture keeps every pixel. The result is a new layer "
        "over the margins. If the job fails the canvas gets its size back.",
        1.0,
    ),
}


# --- Recent results ------------------------------------------------------------------------------


def png_pixbuf(data: bytes) -> GdkPixbuf.Pixbuf:
    loader = GdkPixbuf.PixbufLoader.new_with_type("png")
    loader.write(data)
    loader.close()
    return loader.get_pixbuf()


def png_rgba(data: bytes) -> tuple[canvas.Extent, bytes]:
    """A PNG's size and pixels as the wire's RGBA (rows of an RGBA pixbuf have no padding)."""
    pixbuf = png_pixbuf(data)
    if not pixbuf.get_has_alpha():  # the daemon saves RGB
        pixbuf = pixbuf.add_alpha(False, 0, 0, 0)
    extent = canvas.Extent(pixbuf.get_width(), pixbuf.get_height())
    return extent, pixbuf.read_pixel_bytes().get_data()


class RecentDialog:
    """The daemon's results to pick from, newest first: thumbnail, prompt, seed and size, the
    A1111 parameters as the tooltip; Older… adds the next page while there is one."""

    def __init__(self, title: str, session: Session, page: ResultsPage) -> None:
        self.session = session
        self.dialog = GimpUi.Dialog(title=title, role=PLUG_IN_BINARY)
        self.dialog.add_button("_Cancel", Gtk.ResponseType.CANCEL)
        self.dialog.add_button("_OK", Gtk.ResponseType.OK)
        self.dialog.set_default_response(Gtk.ResponseType.OK)
        # thumbnail, text (markup), tooltip (markup), the result's number
        self.store = Gtk.ListStore(GdkPixbuf.Pixbuf, str, str, GObject.TYPE_INT64)
        self.view = Gtk.TreeView(model=self.store, headers_visible=False, tooltip_column=2)
        self.view.append_column(Gtk.TreeViewColumn("", Gtk.CellRendererPixbuf(), pixbuf=0))
        self.view.append_column(Gtk.TreeViewColumn("", Gtk.CellRendererText(), markup=1))
        self.view.get_selection().set_mode(Gtk.SelectionMode.BROWSE)  # always one picked
        self.view.connect("row-activated", self._on_activated)
        scroller = Gtk.ScrolledWindow(hscrollbar_policy=Gtk.PolicyType.NEVER)
        scroller.set_size_request(460, 420)
        scroller.add(self.view)
        self.status = Gtk.Label(label=f"From the daemon at {session.address}", xalign=0.0)
        self.status.set_line_wrap(True)
        self.older = Gtk.Button.new_with_mnemonic("Ol_der…")
        self.older.connect("clicked", self._on_older)
        box = self.dialog.get_content_area()
        box.set_spacing(8)
        box.set_border_width(12)
        box.pack_start(self.status, False, False, 0)
        box.pack_start(scroller, True, True, 0)
        box.pack_start(self.older, False, False, 0)
        self.add(page)
        self.view.get_selection().select_path(Gtk.TreePath.new_first())  # the newest
        self.dialog.show_all()

    def add(self, page: ResultsPage) -> None:
        for result in page.results:
            thumbnail = fit(png_pixbuf(result.thumbnail["data"]), THUMBNAIL_SIDE)
            label, line = html.escape(result.label, False), html.escape(details(result), False)
            text = f"{label}\n<small>{line}</small>"
            tooltip = html.escape(result.parameters, False)
            self.store.append([thumbnail, text, tooltip, result.number])
        self.older.set_sensitive(page.more)

    def _on_older(self, _button: Gtk.Button) -> None:
        try:
            self.add(list_results(self.session, before=self.store[-1][3]))
        except RecentError as exc:  # the daemon went away: the rows shown can still be placed
            self.status.set_text(str(exc))

    def _on_activated(self, *_args: Any) -> None:
        self.dialog.response(Gtk.ResponseType.OK)

    def chosen(self) -> int:
        model, row = self.view.get_selection().get_selected()
        return model[row][3]

    def run(self) -> int:
        """The picked result's number; raises Cancelled when the artist closes the dialog."""
        try:
            if self.dialog.run() != Gtk.ResponseType.OK:
                raise Cancelled()
            return self.chosen()
        finally:
            self.dialog.destroy()


def add_saved_layer(
    image: Gimp.Image | None, drawables: list[Gimp.Drawable], result: SavedResult, show: bool
) -> Gimp.Layer:
    """The result as a new layer above the active one, its top-left corner at the image's
    (where a result of the whole image's size was); without an image, in a new image of its
    size, opened in a window when `show`."""
    assert result.image is not None  # fetch_result brings it or raises
    extent, rgba = png_rgba(result.image["data"])
    placement = canvas.Placement(canvas.Bounds.of(extent), bytearray(rgba))
    name = canvas.layer_name(result.prompt, result.seed)
    if image is not None:
        layer = add_result_layer(image, drawables, placement, name)
    else:
        image = Gimp.Image.new(extent.width, extent.height, Gimp.ImageBaseType.RGB)
        image.undo_disable()  # a new picture, as if opened from a file: nothing to undo
        layer = add_result_layer(image, [], placement, name)
        image.undo_enable()
        if show:
            Gimp.Display.new(image)
    Gimp.displays_flush()
    return layer


def run_recent(
    procedure: Gimp.Procedure,
    run_mode: Gimp.RunMode,
    image: Gimp.Image | None,
    drawables: list[Gimp.Drawable],
    config: Gimp.ProcedureConfig,
    _data: Any,
) -> Gimp.ValueArray:
    def work() -> Gimp.Layer:
        address = text_property(config, "address") or saved_address()
        try:
            with connect(address, RESULTS_TIMEOUT) as session:
                number = config.get_property("number")
                if run_mode == Gimp.RunMode.INTERACTIVE:
                    GimpUi.init(PLUG_IN_BINARY)
                    page = list_results(session)
                    number = RecentDialog(dialog_title(procedure), session, page).run()
                    config.set_property("number", number)  # Repeat Last places it again
                result = fetch_result(session, number)
        except NoSuchResult as exc:
            raise calling_error(str(exc)) from exc
        except RecentError as exc:
            raise execution_error(str(exc)) from exc
        return add_saved_layer(image, drawables, result, run_mode != Gimp.RunMode.NONINTERACTIVE)

    return returning_layer(procedure, work)


def create_recent(plug_in: Gimp.PlugIn) -> Gimp.Procedure:
    procedure = Gimp.ImageProcedure.new(plug_in, RECENT, Gimp.PDBProcType.PLUGIN, run_recent, None)
    procedure.set_image_types("RGB*, GRAY*")
    # Also with no image open: the result then opens as a new image.
    procedure.set_sensitivity_mask(
        Gimp.ProcedureSensitivityMask.DRAWABLE
        | Gimp.ProcedureSensitivityMask.DRAWABLES
        | Gimp.ProcedureSensitivityMask.NO_DRAWABLES
        | Gimp.ProcedureSensitivityMask.NO_IMAGE
    )
    procedure.set_menu_label("Re_cent results...")
    procedure.add_menu_path(MENU)
    procedure.set_documentation(
        "Places a result the sdbridge daemon saved earlier on a new layer",
        "Lists the daemon's saved results, newest first (on a daemon with a token only those "
        "of this user's editors); the one picked lands at the image's top-left "
        "corner, or in a new image when none is open. Run from a script, it places result "
        "`number` (0: the newest) without asking.",
        RECENT,
    )
    procedure.set_attribution("sdbridge", "sdbridge", "2026")
    procedure.add_int_argument(
        "number",
        "_Number",
        "The result's number as the list shows it (#12); 0: the newest",
        0,
        GLib.MAXINT32,
        0,
        RW,
    )
    procedure.add_string_argument(
        "address", "_Daemon address", "Empty: the address used last", "", RW
    )
    procedure.add_layer_return_value("layer", "Layer", "The new layer", False, RW)
    return procedure


def add_control_arguments(procedure: Gimp.Procedure) -> None:
    """A layer that steers Generate and Repaint: where it is drawn, the picture goes."""
    procedure.add_drawable_argument(
        "control",
        "Control layer",  # no mnemonic: its letters are taken (Cancel, OK, Random seed, ...)
        "A layer that steers the picture (a scribble where it should go, a sketch, line art); "
        "none: no control. It is no part of the picture the job starts from",
        True,
        RW,
    )
    kinds = Gimp.Choice.new()
    for number, (name, label) in enumerate(KINDS.items()):
        kinds.add(name, number, label, "")
    procedure.add_choice_argument(
        "control-kind",
        "Control _kind",
        "What the control layer is: scribble (strokes or blobs on a transparent layer), "
        "canny (a picture whose edges steer), none (already a control image)",
        kinds,
        "scribble",
        RW,
    )
    procedure.add_string_argument(
        "control-model",
        "ControlNet",  # no mnemonic: its letters are taken
        "A ControlNet the daemon has; empty: its first one for the model",
        "",
        RW,
    )
    procedure.add_double_argument(
        "control-strength",
        "Control strengt_h",
        "How strongly the control layer steers",
        0.0,
        MAX_CONTROL_STRENGTH,
        1.0,
        RW,
    )


class SdbridgePlugIn(Gimp.PlugIn):
    def do_set_i18n(self, _name: str) -> tuple[bool, str | None, str | None]:
        return False, None, None  # English only: no catalog to look for

    def do_query_procedures(self) -> list[str]:
        return [*PROCEDURES, RECENT]

    def do_create_procedure(self, name: str) -> Gimp.Procedure:
        if name == RECENT:
            return create_recent(self)
        mode, label, blurb, help_text, strength = PROCEDURES[name]
        callback = functools.partial(run, mode=mode)
        procedure = Gimp.ImageProcedure.new(self, name, Gimp.PDBProcType.PLUGIN, callback, None)
        procedure.set_image_types("RGB*, GRAY*")
        procedure.set_sensitivity_mask(
            Gimp.ProcedureSensitivityMask.DRAWABLE
            | Gimp.ProcedureSensitivityMask.DRAWABLES
            | Gimp.ProcedureSensitivityMask.NO_DRAWABLES
        )
        procedure.set_menu_label(label)
        procedure.add_menu_path(MENU)
        procedure.set_documentation(blurb, help_text, name)
        procedure.set_attribution("sdbridge", "sdbridge", "2026")
        procedure.add_string_argument("prompt", "_Prompt", "What to paint", "", RW)
        if mode is Mode.EXPAND:
            # No mnemonics: the letters of left, top, right and bottom are all taken.
            for side, default in zip(MARGINS, (0, 0, 128, 0), strict=True):
                procedure.add_int_argument(
                    side, side.title(), f"Pixels added on the {side}", 0, MAX_MARGIN, default, RW
                )
        procedure.add_string_argument(
            "negative-prompt", "Negati_ve prompt", "What to avoid", "", RW
        )
        procedure.add_int_argument(
            "steps",
            "S_teps",
            "Denoising steps; 0: the model's default (few-step models get their own)",
            0,
            MAX_STEPS_ARGUMENT,
            0,
            RW,
        )
        procedure.add_double_argument(
            "guidance",
            "G_uidance",
            "Classifier-free guidance scale; below 0: the model's default",
            -1.0,
            MAX_GUIDANCE,
            -1.0,
            RW,
        )
        procedure.add_string_argument(
            "scheduler",
            "S_ampler",
            "A sampler the daemon offers (hello.schedulers); empty: the model's default",
            "",
            RW,
        )
        procedure.add_boolean_argument(
            "random-seed",
            "Ra_ndom seed",
            "The daemon picks the seed (the layer name shows it); off: use Seed",
            True,
            RW,
        )
        procedure.add_uint_argument(
            "seed",
            "S_eed",
            "The seed when Random seed is off: type a layer name's seed to repeat its picture",
            0,
            MAX_SEED,
            0,
            RW,
        )
        procedure.add_double_argument(
            "strength", "Stren_gth", "How much of the area is repainted", 0.01, 1.0, strength, RW
        )
        procedure.add_string_argument(
            "model", "_Model", "A model the daemon has; empty: its loaded model", "", RW
        )
        procedure.add_string_argument(
            "loras",
            "LoRAs",  # no mnemonic: its letters are taken (load-defaults, OK, reset, sampler)
            "LoRAs the daemon has, with weights: ink:0.7, paper (weight 1); empty: none",
            "",
            RW,
        )
        procedure.add_double_argument(
            "refine-strength",
            "Re_fine",
            "A second pass for an area larger than the model's size, repainted at this strength "
            "(0.2-0.4 keeps the picture); 0: off",
            0.0,
            1.0,
            0.0,
            RW,
        )
        procedure.add_int_argument(
            "images",
            "Images",  # no mnemonic: every letter of it is taken
            "How many images: one layer each, the first shown, the others hidden to pick from",
            1,
            MAX_IMAGES_ARGUMENT,
            1,
            RW,
        )
        if mode is not Mode.EXPAND:
            add_control_arguments(procedure)
        procedure.add_string_argument(
            "style",
            "St_yle",
            "A style preset from the styles file shared with Krita and the CLI; empty: none",
            "",
            RW,
        )
        procedure.add_string_argument(
            "address", "_Daemon address", "Empty: the address used last", "", RW
        )
        procedure.add_double_argument(
            "timeout", "T_imeout (s)", "Give up after this long", 1.0, 3600.0, 600.0, RW
        )
        procedure.add_layer_return_value("layer", "Layer", "The new layer", False, RW)
        return procedure


if __name__ == "__main__":
    Gimp.main(SdbridgePlugIn.__gtype__, sys.argv)
