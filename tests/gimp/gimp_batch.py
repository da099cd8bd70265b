# Helpers for test code that runs INSIDE GIMP 3 (python-fu-eval, GIMP's Python 3.13).
# gimp_runner.py puts MARKERS, PLUGIN_DIR and WORK in front of this file and the test's code
# after it. Never sys.exit() here: GIMP reports an exception as exit status 64.
# ruff: noqa: F821  (those three names come from the runner)

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
