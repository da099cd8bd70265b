"""Screenshots of the real GIMP 3 window (under Xvfb in the chroot) after Filters > sdbridge >
Generate painted a layer, of the plug-in's dialog (gimp-dialog.png beside it) and of the Recent
results list (gimp-recent.png):

    .venv/bin/python tests/gimp/screenshot.py docs/images/gimp.png [--model SPEC]

Without --model it serves the embedded default model when present, else the small test pipeline.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]  # tests/ for helpers.py, pipelines.py

from gimp_runner import Gimp, chroot_missing  # noqa: E402
from helpers import DaemonProcess  # noqa: E402
from pipelines import build_pipeline  # noqa: E402

from sdbridge import tiny  # noqa: E402
from sdbridge.wire.client import Client  # noqa: E402

SCENE = """
import subprocess

W, H = 512, 320
sky = bytes(v for y in range(H) for x in range(W) for v in (40 + y // 3, 90 + y // 4, 160))
image, background = new_image(W, H, sky)
image.select_rectangle(Gimp.ChannelOps.REPLACE, 96, 48, 320, 224)
status, value, seconds = call(
    "python-fu-sdbridge-generate", image, [background], prompt=PROMPT, random_seed=False,
    seed=7, steps=20, address=ADDRESS, timeout=300.0,
)
mark(status=status, value=value, layers=layers(image))
Gimp.Display.new(image)
Gimp.displays_flush()
time.sleep(4)  # GIMP's window paints asynchronously
subprocess.run(["import", "-window", "root", f"{WORK}/gimp.png"], check=True)
image.clean_all()  # no "save changes?" box on quit

# The plug-in's own dialog, filled in as the user did.
gi.require_version("GimpUi", "3.0")
gi.require_version("Gtk", "3.0")
from gi.repository import GimpUi, Gtk

plugin = load_plugin_module()
GimpUi.init("sdbridge-screenshot")
procedure = Gimp.get_pdb().lookup_procedure(plugin.GENERATE)
config = procedure.create_config()
settings = (("prompt", PROMPT), ("random-seed", False), ("seed", 7), ("steps", 20))
for name, value in (*settings, ("address", ADDRESS)):
    config.set_property(name, value)
dialog = plugin.build_dialog(procedure, config)
dialog.show_all()
for _ in range(40):
    while Gtk.events_pending():
        Gtk.main_iteration()
    time.sleep(0.025)
box = dialog.get_window().get_frame_extents()
mark(dialog=[box.x, box.y, box.x + box.width, box.y + box.height])
subprocess.run(["import", "-window", "root", f"{WORK}/dialog.png"], check=True)
dialog.destroy()

# The Recent results list: the picture above and the earlier ones.
recent = Gimp.get_pdb().lookup_procedure(plugin.RECENT)
session = plugin.connect(ADDRESS)
dialog = plugin.RecentDialog(plugin.dialog_title(recent), session, plugin.list_results(session))
for _ in range(40):
    while Gtk.events_pending():
        Gtk.main_iteration()
    time.sleep(0.025)
box = dialog.dialog.get_window().get_frame_extents()
mark(recent=[box.x, box.y, box.x + box.width, box.y + box.height])
subprocess.run(["import", "-window", "root", f"{WORK}/recent.png"], check=True)
dialog.dialog.destroy()
session.close()
"""
EARLIER = (  # made before the screenshots, so that the list has more than one row
    (3, "a red circle at the top left on a green background"),
    (5, "a blue square in the center on a white background"),
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--model", help="model for the daemon (default: see above)")
    parser.add_argument(
        "--prompt", default="a large yellow star in the center on a blue background"
    )
    args = parser.parse_args()
    reason = chroot_missing()
    if reason:
        print(reason, file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None and tiny.is_present():
            model = tiny.MODEL_DIR
        if model is None:
            model = Path(tmp) / "tiny-sd"
            build_pipeline(model)
        daemon = DaemonProcess(model, Path(tmp)).start()
        gimp = Gimp()
        try:
            with Client(daemon.address) as client:
                for seed, prompt in EARLIER:
                    client.generate(prompt=prompt, seed=seed, num_inference_steps=20).result(300)
            code = f"PROMPT = {args.prompt!r}\nADDRESS = {daemon.address!r}\n{SCENE}"
            markers = gimp.run(code, timeout=240, gui=True).checked()
            if markers["status"] != "success":
                print(f"Generate failed: {markers}", file=sys.stderr)
                return 1
            args.out.parent.mkdir(parents=True, exist_ok=True)
            with Image.open(gimp.host("gimp.png")) as shot:
                shot.crop(shot.getbbox()).save(args.out)  # the window, not the black screen
            with Image.open(gimp.host("dialog.png")) as shot:
                shot.crop(tuple(markers["dialog"])).save(args.out.with_name("gimp-dialog.png"))
            with Image.open(gimp.host("recent.png")) as shot:
                shot.crop(tuple(markers["recent"])).save(args.out.with_name("gimp-recent.png"))
        finally:
            gimp.remove()
            daemon.stop()
    print(f"wrote {args.out}, {args.out.with_name('gimp-dialog.png')} and gimp-recent.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
