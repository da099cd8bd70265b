#!/usr/bin/env python3
"""sdbridge for GIMP 3: Filters > sdbridge > Generate... and Repaint selection...

Both procedures send the image (or selection) to a running `sdbridge serve` daemon and put the
result on a new layer. The request and the placement rules come from `sdbridge.editor`, shared
with the Krita plugin; this file only reads and writes GIMP's pixels and drives the UI.
`sdbridge install gimp` puts the pure-Python sdbridge modules and msgpack in `vendor/` here.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import queue
import random
import sys
import time
import traceback
from typing import Any

import gi

gi.require_version("Gimp", "3.0")
gi.require_version("GimpUi", "3.0")
gi.require_version("Gegl", "0.4")
gi.require_version("Gtk", "3.0")
gi.require_version("GdkPixbuf", "2.0")
from gi.repository import GdkPixbuf, Gegl, Gimp, GimpUi, GLib, GObject, Gtk  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "vendor"))
try:
    from sdbridge import canvas
    from sdbridge.wire.client import Client, ClientError, Job, JobEvent
    from sdbridge.wire.protocol import ADDRESS_ENV, DEFAULT_ADDRESS

    IMPORT_ERROR = ""
except ImportError as exc:  # still register, so the menu entry can say what is wrong
    IMPORT_ERROR = (
        f"the sdbridge client modules are missing ({exc}); "
        "reinstall the plug-in with `sdbridge install gimp`"
    )

PLUG_IN_BINARY = "sdbridge_gimp"
GENERATE = "python-fu-sdbridge-generate"
REPAINT = "python-fu-sdbridge-repaint-selection"
MENU = "<Image>/Filters/sdbridge"
SETTINGS_FILE = "sdbridge.json"  # in the GIMP profile: the address both procedures share
RGBA = "R'G'B'A u8"  # the wire's 8-bit RGBA; babl converts from any image precision
MASK = "Y u8"
HELLO_TIMEOUT = 10.0  # a daemon that accepts but never answers must not hang GIMP
PREVIEW_SIDE = 192  # px, the longer side of the live preview in the progress window
POLL_INTERVAL = 0.05  # how often the progress dialog handles clicks while waiting
G_MAXINT = 2**31 - 1


class PluginError(Exception):
    """Ends the procedure with `status` and this text as the PDB error message."""

    def __init__(self, message: str, status: Gimp.PDBStatusType) -> None:
        super().__init__(message)
        self.status = status


class Cancelled(Exception):
    pass


def calling_error(message: str) -> PluginError:
    return PluginError(message, Gimp.PDBStatusType.CALLING_ERROR)


def execution_error(message: str) -> PluginError:
    return PluginError(message, Gimp.PDBStatusType.EXECUTION_ERROR)


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


def visible_pixels(image: Gimp.Image, bounds: canvas.Bounds) -> bytes:
    """What the user sees (all visible layers merged) over `bounds`, as RGBA."""
    merged = Gimp.Layer.new_from_visible(image, image, "sdbridge source")
    try:
        return read_buffer(merged, bounds, RGBA)
    finally:
        merged.delete()


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
        self.label = Gtk.Label(label="Connecting to the sdbridge daemon...")
        self.bar = Gtk.ProgressBar()
        self.preview = Gtk.Image()
        box = self.dialog.get_content_area()
        box.set_spacing(8)
        box.set_border_width(12)
        box.pack_start(self.preview, False, False, 0)
        box.pack_start(self.label, False, False, 0)
        box.pack_start(self.bar, False, False, 0)
        self.dialog.show_all()

    def _on_cancel(self, *_args: Any) -> bool:
        self.cancel_requested = True
        self.label.set_text("Cancelling...")
        return True  # keep the window until the daemon confirms

    def show(self, text: str, fraction: float | None) -> None:
        self.label.set_text(text)
        if fraction is not None:
            self.bar.set_fraction(fraction)

    def show_preview(self, image: dict[str, Any]) -> None:
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
        scale = PREVIEW_SIDE / max(width, height)
        self.preview.set_from_pixbuf(
            pixbuf.scale_simple(
                max(1, round(width * scale)),
                max(1, round(height * scale)),
                GdkPixbuf.InterpType.BILINEAR,
            )
        )

    def pump(self) -> None:
        while Gtk.events_pending():
            Gtk.main_iteration()

    def close(self) -> None:
        self.dialog.destroy()
        self.pump()


def show_progress(text: str, fraction: float | None, dialog: ProgressDialog | None) -> None:
    Gimp.progress_set_text(text)
    if fraction is not None:
        Gimp.progress_update(fraction)
    if dialog is not None:
        dialog.show(text, fraction)


def wait_for_result(
    job: Job, address: str, timeout: float, dialog: ProgressDialog | None
) -> JobEvent:
    """Follows the job's events on GIMP's thread (libgimp calls are not thread-safe) until the
    result; cancels the job on the daemon when the user cancels or the timeout passes."""
    events: queue.SimpleQueue[JobEvent] = queue.SimpleQueue()
    job.subscribe(events.put)
    deadline = time.monotonic() + timeout
    cancelled = False
    while True:
        if dialog is not None:
            dialog.pump()
            if dialog.cancel_requested and not cancelled:
                job.cancel()
                cancelled = True
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            job.cancel()
            raise execution_error(
                f"sdbridge: no result from the daemon at {address} within "
                f"{timeout:g} s; the job was cancelled"
            )
        try:
            event = events.get(timeout=min(remaining, POLL_INTERVAL if dialog else 1.0))
        except queue.Empty:
            continue
        kind = event.get("event")
        if kind == "accepted" and event.get("position", 0) > 0:
            show_progress(f"sdbridge: queued, {event['position']} job(s) ahead", None, dialog)
        elif kind == "progress":
            step, total = event["step"], event["total"]
            text = f"sdbridge: step {step}/{total}, {event.get('eta', 0):.0f} s left"
            show_progress(text, step / total, dialog)
        elif kind == "preview" and dialog is not None:
            dialog.show_preview(event["image"])
        elif kind == "result":
            return event
        elif kind == "cancelled":
            raise Cancelled()
        elif kind == "error":
            field = f", field {event['field']}" if event.get("field") else ""
            raise execution_error(
                f"sdbridge: the job failed: {event.get('message')} ({event.get('code')}{field})"
            )


@dataclasses.dataclass(frozen=True)
class Params:
    settings: canvas.Settings
    address: str
    timeout: float

    @staticmethod
    def from_config(config: Gimp.ProcedureConfig) -> Params:
        seed = config.get_property("seed")
        return Params(
            settings=canvas.Settings(
                prompt=text_property(config, "prompt"),
                negative_prompt=text_property(config, "negative-prompt"),
                steps=config.get_property("steps"),
                guidance_scale=config.get_property("guidance"),
                strength=config.get_property("strength"),
                # Picked here, not by the daemon, so that the seed in the layer name fits
                # this argument's range and can be typed back in to repeat a picture.
                seed=random.randint(0, G_MAXINT) if seed < 0 else seed,
                model=text_property(config, "model") or None,
            ),
            address=text_property(config, "address") or saved_address(),
            timeout=config.get_property("timeout"),
        )


def text_property(config: Gimp.ProcedureConfig, name: str) -> str:
    # The PDB hands an empty string argument over as None.
    return (config.get_property(name) or "").strip()


def plan(image: Gimp.Image, repaint: bool) -> canvas.JobPlan:
    extent = canvas.Extent(image.get_width(), image.get_height())
    selection = selection_bounds(image)
    try:
        if not repaint:
            return canvas.plan_area(extent, selection)
        mask = None
        if selection is not None:
            mask = read_buffer(image.get_selection(), selection, MASK)
        return canvas.plan_job(extent, selection, mask)
    except canvas.SelectionOutsideCanvas as exc:
        raise calling_error(f"sdbridge: {exc}") from exc


def paint(
    image: Gimp.Image,
    drawables: list[Gimp.Drawable],
    params: Params,
    repaint: bool,
    dialog: ProgressDialog | None,
) -> Gimp.Layer:
    settings = params.settings
    if not settings.prompt:
        raise calling_error("sdbridge: the prompt is empty")
    job_plan = plan(image, repaint)
    needs_pixels = settings.strength < 1.0 or job_plan.mask is not None
    rgba = visible_pixels(image, job_plan.bounds) if needs_pixels else None
    if dialog is not None:  # someone is watching: ask for a preview at every step
        settings = dataclasses.replace(settings, preview_every=1)
    fields = canvas.generate_fields(settings, job_plan, rgba)
    try:
        client = Client(params.address, timeout=HELLO_TIMEOUT, client_name="gimp-sdbridge")
    except ValueError as exc:
        raise calling_error(f"sdbridge: {exc}") from exc
    Gimp.progress_init(f"sdbridge: {settings.prompt[:60]}")
    with client:
        try:
            client.hello()
            job = client.generate(**fields)
        except ClientError as exc:  # its message names the address and what to do
            raise execution_error(f"sdbridge: {exc.message}") from exc
        result = wait_for_result(job, params.address, params.timeout, dialog)
    image_map = result["images"][0]
    placement = canvas.place_result(image_map, job_plan)
    layer = add_result_layer(
        image, drawables, placement, canvas.layer_name(settings.prompt, image_map["seed"])
    )
    Gimp.displays_flush()
    unsaved = canvas.unsaved_warning(result)
    if unsaved:  # the layer holds the image; only the daemon's file is missing
        Gimp.message(f"sdbridge: {unsaved}")
    return layer


# --- the procedures ------------------------------------------------------------------------------

DIALOG_FIELDS = [
    "prompt-frame",
    "negative-prompt-frame",
    "steps",
    "guidance",
    "seed",
    "strength",
    "model",
    "address",
    "timeout",
]


def dialog_title(procedure: Gimp.Procedure) -> str:
    return "sdbridge: " + procedure.get_menu_label().replace("_", "").rstrip(".")


def build_dialog(procedure: Gimp.Procedure, config: Gimp.ProcedureConfig) -> GimpUi.Dialog:
    """The parameter dialog (GimpUi.init must have run)."""
    # GIMP restores each procedure's own last values; the address is the one both share.
    config.set_property("address", saved_address())
    # An empty string argument comes back as None, which a text entry refuses.
    config.set_property("model", text_property(config, "model"))
    dialog = GimpUi.ProcedureDialog.new(procedure, config, dialog_title(procedure))
    # A slider: the default spin box cannot step through a range narrower than 1.
    dialog.get_spin_scale("strength", 1.0)
    # Prompts are often long: multi-line text boxes, titled since a text box has no label.
    for name, title in (("prompt", "_Prompt"), ("negative-prompt", "_Negative prompt")):
        view = dialog.get_widget(name, Gtk.TextView)
        view.set_wrap_mode(Gtk.WrapMode.WORD)
        view.set_size_request(360, 60)
        dialog.get_label(f"{name}-title", title, False, True).set_mnemonic_widget(view)
        dialog.fill_frame(f"{name}-frame", f"{name}-title", False, name)
    dialog.fill(DIALOG_FIELDS)
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
    repaint: bool,
) -> Gimp.ValueArray:
    dialog = None
    try:
        if IMPORT_ERROR:
            raise execution_error(f"sdbridge: {IMPORT_ERROR}")
        if run_mode != Gimp.RunMode.NONINTERACTIVE:  # the menu, or Filters > Repeat Last
            GimpUi.init(PLUG_IN_BINARY)
            if run_mode == Gimp.RunMode.INTERACTIVE:
                ask(procedure, config)
            dialog = ProgressDialog(dialog_title(procedure))
        layer = paint(image, drawables, Params.from_config(config), repaint, dialog)
    except Cancelled:
        return procedure.new_return_values(Gimp.PDBStatusType.CANCEL, GLib.Error())
    except PluginError as exc:
        return procedure.new_return_values(exc.status, GLib.Error(str(exc)))
    except Exception as exc:  # a bug must still end as a PDB error, never a dead plug-in
        traceback.print_exc()
        return procedure.new_return_values(
            Gimp.PDBStatusType.EXECUTION_ERROR, GLib.Error(f"sdbridge: internal error: {exc!r}")
        )
    finally:
        Gimp.progress_end()
        if dialog is not None:
            dialog.close()
    values = procedure.new_return_values(Gimp.PDBStatusType.SUCCESS, GLib.Error())
    values.remove(1)
    values.insert(1, GObject.Value(Gimp.Layer, layer))
    return values


RW = GObject.ParamFlags.READWRITE

PROCEDURES = {
    GENERATE: (
        False,
        "_Generate...",
        "A new layer painted from the prompt by the sdbridge daemon",
        "Sized to the selection's bounds (or the image) and placed there. With strength < 1 "
        "the visible pixels of that area are the starting point (img2img).",
        1.0,
    ),
    REPAINT: (
        True,
        "_Repaint selection...",
        "Repaints the selection with the sdbridge daemon (img2img / inpainting)",
        "Sends the visible pixels around the selection and the selection as the mask; the "
        "result is a new layer on which only the selected pixels are opaque. Without a "
        "selection the whole image is repainted. Strength: how much changes (1 = all).",
        0.75,
    ),
}


class SdbridgePlugIn(Gimp.PlugIn):
    def do_set_i18n(self, _name: str) -> tuple[bool, str | None, str | None]:
        return False, None, None  # English only: no catalog to look for

    def do_query_procedures(self) -> list[str]:
        return list(PROCEDURES)

    def do_create_procedure(self, name: str) -> Gimp.Procedure:
        repaint, label, blurb, help_text, strength = PROCEDURES[name]
        callback = functools.partial(run, repaint=repaint)
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
        procedure.add_string_argument(
            "negative-prompt", "_Negative prompt", "What to avoid", "", RW
        )
        procedure.add_int_argument("steps", "S_teps", "Denoising steps", 1, 150, 20, RW)
        procedure.add_double_argument(
            "guidance", "G_uidance", "Classifier-free guidance scale", 0.0, 30.0, 7.5, RW
        )
        procedure.add_int_argument("seed", "S_eed", "-1: a random seed", -1, G_MAXINT, -1, RW)
        procedure.add_double_argument(
            "strength", "Stren_gth", "How much of the area is repainted", 0.01, 1.0, strength, RW
        )
        procedure.add_string_argument(
            "model", "_Model", "A model the daemon has; empty: its loaded model", "", RW
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
