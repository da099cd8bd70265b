# Helpers for test code that runs INSIDE GIMP 3 (python-fu-eval, GIMP's Python 3.13).
# gimp_runner.py puts MARKERS, PLUGIN_DIR and WORK in front of this file and the test's code
# after it. Never sys.exit() here: GIMP reports an exception as exit status 64.
# ruff: noqa: F821  (those three names come from the runner)

import ctypes
import importlib.util
import json
import sys
import time

import gi

gi.require_version("Gegl", "0.4")
from gi.repository import Gegl, Gimp, Gio  # noqa: E402

_markers = {}


def mark(**values):
    """Record results for the host; written at once so a later crash keeps them."""
    _markers.update(values)
    with open(MARKERS, "w") as f:
        json.dump(_markers, f)


def new_image(width, height, pixels):
    """An RGB image with one opaque layer holding `pixels` (RGB bytes, rows top to bottom)."""
    image = Gimp.Image.new(width, height, Gimp.ImageBaseType.RGB)
    layer = Gimp.Layer.new(
        image, "background", width, height, Gimp.ImageType.RGB_IMAGE, 100.0, Gimp.LayerMode.NORMAL
    )
    image.insert_layer(layer, None, 0)
    buffer = layer.get_buffer()
    buffer.set(Gegl.Rectangle.new(0, 0, width, height), "R'G'B' u8", bytes(pixels))
    buffer.flush()
    return image, layer


def call(name, image, drawables, **arguments):
    """Runs a procedure non-interactively; returns (status nick, error text or the name of the
    returned layer, seconds)."""
    procedure = Gimp.get_pdb().lookup_procedure(name)
    config = procedure.create_config()
    config.set_property("run-mode", Gimp.RunMode.NONINTERACTIVE)
    config.set_property("image", image)
    config.set_core_object_array("drawables", drawables)
    for key, value in arguments.items():
        config.set_property(key.replace("_", "-"), value)
    start = time.monotonic()
    result = procedure.run(config)
    seconds = time.monotonic() - start
    status = result.index(0)
    value = result.index(1)
    if status == Gimp.PDBStatusType.SUCCESS:
        value = value.get_name()
    return status.value_nick, value, seconds


def export(image, name):
    """The image as the user sees it (all visible layers) into WORK/name, a PNG."""
    Gimp.file_save(
        Gimp.RunMode.NONINTERACTIVE, image, Gio.File.new_for_path(f"{WORK}/{name}"), None
    )


def save_selection(image, name):
    """The selection mask of the whole image, one byte per pixel, into WORK/name."""
    rect = Gegl.Rectangle.new(0, 0, image.get_width(), image.get_height())
    data = image.get_selection().get_buffer().get(rect, 1.0, "Y u8", Gegl.AbyssPolicy.NONE)
    with open(f"{WORK}/{name}", "wb") as f:
        f.write(bytes(data))


def save_pixels(drawable, name):
    """A drawable's own pixels (not the composite), RGBA rows top to bottom, into WORK/name."""
    rect = Gegl.Rectangle.new(0, 0, drawable.get_width(), drawable.get_height())
    data = drawable.get_buffer().get(rect, 1.0, "R'G'B'A u8", Gegl.AbyssPolicy.NONE)
    with open(f"{WORK}/{name}", "wb") as f:
        f.write(bytes(data))


def layers(image):
    return [
        {
            "name": layer.get_name(),
            "offsets": list(layer.get_offsets()[1:]),
            "size": [layer.get_width(), layer.get_height()],
        }
        for layer in image.get_layers()
    ]


def load_plugin_module():
    """The plug-in's own module, to drive its dialog code from a test."""
    spec = importlib.util.spec_from_file_location("sdbridge_gimp", f"{PLUGIN_DIR}/sdbridge_gimp.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["sdbridge_gimp"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def dialog_plugin():
    """The plug-in's module with GimpUi set up, to build its dialogs (runs with a display)."""
    gi.require_version("GimpUi", "3.0")
    gi.require_version("Gtk", "3.0")
    from gi.repository import GimpUi

    GimpUi.init("sdbridge-test")
    return load_plugin_module()


def show(dialog):
    """Shows a dialog and lets GTK draw it."""
    from gi.repository import Gtk

    dialog.show_all()
    while Gtk.events_pending():
        Gtk.main_iteration()


# --- pressing a dialog's buttons from outside (there is no xdotool in the chroot) ---------------


class _XKeyEvent(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_int),
        ("serial", ctypes.c_ulong),
        ("send_event", ctypes.c_int),
        ("display", ctypes.c_void_p),
        ("window", ctypes.c_ulong),
        ("root", ctypes.c_ulong),
        ("subwindow", ctypes.c_ulong),
        ("time", ctypes.c_ulong),
        ("x", ctypes.c_int),
        ("y", ctypes.c_int),
        ("x_root", ctypes.c_int),
        ("y_root", ctypes.c_int),
        ("state", ctypes.c_uint),
        ("keycode", ctypes.c_uint),
        ("same_screen", ctypes.c_int),
        ("padding", ctypes.c_long * 16),  # an XEvent is 24 longs
    ]


# Xlib's default error handler ends the process; a window that closes while we look at it
# (BadWindow) is routine here.
_XErrorHandler = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)
_ignore_x_errors = _XErrorHandler(lambda display, event: 0)


def _xlib():
    x11 = ctypes.cdll.LoadLibrary("libX11.so.6")
    x11.XSetErrorHandler.argtypes = [_XErrorHandler]
    x11.XSetErrorHandler(_ignore_x_errors)
    x11.XOpenDisplay.restype = ctypes.c_void_p
    x11.XDefaultRootWindow.argtypes = [ctypes.c_void_p]
    x11.XDefaultRootWindow.restype = ctypes.c_ulong
    window_p = ctypes.POINTER(ctypes.c_ulong)
    x11.XQueryTree.argtypes = [ctypes.c_void_p, ctypes.c_ulong, window_p, window_p]
    x11.XQueryTree.argtypes += [ctypes.POINTER(window_p), ctypes.POINTER(ctypes.c_uint)]
    x11.XFetchName.argtypes = [ctypes.c_void_p, ctypes.c_ulong, ctypes.POINTER(ctypes.c_char_p)]
    x11.XStringToKeysym.argtypes = [ctypes.c_char_p]
    x11.XStringToKeysym.restype = ctypes.c_ulong
    x11.XKeysymToKeycode.argtypes = [ctypes.c_void_p, ctypes.c_ulong]
    x11.XSendEvent.argtypes = [ctypes.c_void_p, ctypes.c_ulong, ctypes.c_int, ctypes.c_long]
    x11.XSendEvent.argtypes += [ctypes.c_void_p]
    x11.XFlush.argtypes = [ctypes.c_void_p]
    return x11


def _find_window(x11, display, window, title, skip):
    name = ctypes.c_char_p()
    fetched = x11.XFetchName(display, window, ctypes.byref(name))
    if fetched and name.value == title.encode() and window not in skip:
        return window
    root, parent = ctypes.c_ulong(), ctypes.c_ulong()
    children, count = ctypes.POINTER(ctypes.c_ulong)(), ctypes.c_uint()
    x11.XQueryTree(
        display, window, ctypes.byref(root), ctypes.byref(parent), ctypes.byref(children),
        ctypes.byref(count),
    )  # fmt: skip
    for i in range(count.value):
        found = _find_window(x11, display, children[i], title, skip)
        if found:
            return found
    return None


def press_mnemonic(title, key, wait=20.0, skip=()):
    """Alt+`key` in the window titled `title` once it shows up (e.g. "o" for _OK), as a user
    would; from a thread, while GIMP runs the dialog's plug-in. GIMP must run with
    GDK_CORE_DEVICE_EVENTS=1: GTK then reads the core key events this sends. Returns the
    window (pass it in `skip` to reach the next window of that title), or None."""
    x11 = _xlib()
    display = x11.XOpenDisplay(None)
    root = x11.XDefaultRootWindow(display)
    deadline = time.monotonic() + wait
    window = None
    while window is None and time.monotonic() < deadline:
        window = _find_window(x11, display, root, title, skip)
        time.sleep(0.2)
    if window is None:
        return None
    time.sleep(1.0)  # mapped is not yet drawn and listening
    keycode = x11.XKeysymToKeycode(display, x11.XStringToKeysym(key.encode()))
    for kind in (2, 3):  # KeyPress, KeyRelease
        event = _XKeyEvent(
            type=kind, display=display, window=window, root=root, x=1, y=1, x_root=1, y_root=1,
            state=1 << 3, keycode=keycode, same_screen=1,
        )  # fmt: skip
        x11.XSendEvent(display, window, 1, 0, ctypes.byref(event))  # Mod1 = Alt
    x11.XFlush(display)
    return window
