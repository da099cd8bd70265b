"""The GIMP 3 plug-in inside the real GIMP 3.0.4 (chroot), against a real daemon on the host."""

from __future__ import annotations

import html
import re
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import zmq
from gimp_runner import Gimp, chroot_missing
from helpers import (
    OldDaemon,
    SilentDaemon,
    ellipse,
    free_port,
    scribble_overlap,
    wait_until,
)
from PIL import Image

from sdbridge import tiny
from sdbridge.editor.canvas import layer_name
from sdbridge.editor.session import CANCEL_GRACE_S, Session
from sdbridge.editor.styles import Style, save_style
from sdbridge.install import package
from sdbridge.wire import protocol
from sdbridge.wire.client import Client, new_session_key

pytestmark = pytest.mark.gimp

GENERATE = "python-fu-sdbridge-generate"
EXPAND = "python-fu-sdbridge-expand"
REPAINT = "python-fu-sdbridge-repaint-selection"
W, H = 96, 64


# Here rather than in a tests/gimp/conftest.py: a second module named `conftest` would take the
# place of tests/conftest.py, which other test modules import helpers from.
@pytest.fixture(scope="session")  # set up (or skipped) before the session's daemon starts
def gimp() -> Iterator[Gimp]:
    """One profile with the plug-in installed, shared by this module's GIMP runs (a profile
    copy costs a second; the first run registers the plug-in, later ones reuse that)."""
    reason = chroot_missing()
    if reason:
        pytest.skip(reason)
    instance = Gimp()
    yield instance
    instance.remove()


def rgba(path: Path) -> bytes:
    with Image.open(path) as image:
        assert image.size == (W, H)
        return image.convert("RGBA").tobytes()


def test_both_procedures_are_registered_under_filters_sdbridge(gimp: Gimp) -> None:
    markers = gimp.run(
        """
        found = {}
        for name in ("python-fu-sdbridge-generate", "python-fu-sdbridge-repaint-selection"):
            procedure = Gimp.get_pdb().lookup_procedure(name)
            found[name] = None if procedure is None else {
                "menu": list(procedure.get_menu_paths()),
                "label": procedure.get_menu_label(),
                "arguments": [spec.name for spec in procedure.get_arguments()],
                "returns": [spec.name for spec in procedure.get_return_values()],
            }
            config = procedure.create_config()
            found[name]["defaults"] = {
                key: config.get_property(key)
                for key in ("steps", "guidance", "scheduler", "random-seed", "seed", "control",
                            "control-kind", "control-model", "control-strength")
            }
            seed = next(s for s in procedure.get_arguments() if s.name == "seed")
            found[name]["seeds"] = [seed.minimum, seed.maximum]
        mark(found=found)
        """
    ).checked()
    arguments = ["run-mode", "image", "drawables", "prompt", "negative-prompt", "steps"]
    arguments += ["guidance", "scheduler", "random-seed", "seed", "strength", "model", "loras"]
    arguments += ["refine-strength", "images", "control", "control-kind", "control-model"]
    arguments += ["control-strength", "style", "address", "timeout"]
    for name, label in ((GENERATE, "_Generate..."), (REPAINT, "_Repaint selection...")):
        info = markers["found"][name]
        assert info is not None, f"{name} is not registered"
        assert info["menu"] == ["<Image>/Filters/sdbridge"] and info["label"] == label
        # GIMP 3.0 adds "num-drawables" before the drawables on its own.
        assert [a for a in info["arguments"] if a != "num-drawables"] == arguments
        assert info["returns"] == ["layer"]
        # Left as they are, steps, guidance and sampler are the model's; the daemon picks the
        # seed, and any seed it reports fits the argument.
        # No control layer unless one is given; then it is a scribble at full strength, read
        # by the daemon's ControlNet for the model.
        assert info["defaults"] == {
            "steps": 0,
            "guidance": -1.0,
            "scheduler": "",
            "random-seed": True,
            "seed": 0,
            "control": None,
            "control-kind": "scribble",
            "control-model": "",
            "control-strength": 1.0,
        }
        assert info["seeds"] == [0, protocol.MAX_SEED]


def test_the_packaged_zip_unpacked_into_plug_ins_runs(gimp: Gimp, tmp_path: Path) -> None:
    unpacked = Gimp(archive=package("gimp", tmp_path))  # `gimp` made sure the chroot is there
    try:
        markers = unpacked.run(
            f"""
            image, background = new_image(8, 8, bytes(8 * 8 * 3))
            result = call({GENERATE!r}, image, [background], prompt="x", address="tcp://127.0.0.1:1")
            mark(result=result[:2])
            """
        ).checked()
    finally:
        unpacked.remove()
    status, error = markers["result"]
    # Registered, ran, and its vendored client got as far as the (absent) daemon.
    assert status == "execution-error" and "is `sdbridge serve` running?" in error


def test_generate_adds_one_layer_over_the_selection_or_the_whole_image(gimp: Gimp, daemon) -> None:
    markers = gimp.run(
        f"""
        grey = bytes([128, 128, 128]) * ({W} * {H})
        image, background = new_image({W}, {H}, grey)
        image.select_rectangle(Gimp.ChannelOps.REPLACE, 10, 8, 40, 30)
        status, value, seconds = call(
            {GENERATE!r}, image, [background], prompt="a red circle", random_seed=False, seed=5,
            steps=4, address={daemon.address!r}, timeout=60.0,
        )
        mark(selection={{"status": status, "value": value, "layers": layers(image)}})
        export(image, "generate-selection.png")

        image, background = new_image({W}, {H}, grey)
        status, value, seconds = call(
            {GENERATE!r}, image, [background], prompt="a blue square", steps=4,
            address={daemon.address!r}, timeout=60.0,
        )
        mark(whole={{"status": status, "value": value, "layers": layers(image)}})
        """
    ).checked()
    selection = markers["selection"]
    # The procedure returns the new layer (here: its name) for scripts to use.
    assert (selection["status"], selection["value"]) == ("success", layer_name("a red circle", 5))
    assert selection["layers"] == [
        {"name": layer_name("a red circle", 5), "offsets": [10, 8], "size": [40, 30]},
        {"name": "background", "offsets": [0, 0], "size": [W, H]},
    ]
    pixels = rgba(gimp.host("generate-selection.png"))
    inside, outside = set(), set()
    for y in range(H):
        for x in range(W):
            i = (y * W + x) * 4
            in_box = 10 <= x < 50 and 8 <= y < 38
            (inside if in_box else outside).add(pixels[i : i + 4])
    assert outside == {bytes([128, 128, 128, 255])}
    assert len(inside) > 50, "the generated layer is empty or flat"

    whole = markers["whole"]
    assert whole["status"] == "success"
    assert whole["layers"][0] == {"name": whole["value"], "offsets": [0, 0], "size": [W, H]}
    assert len(whole["layers"]) == 2


def test_the_daemons_random_seed_typed_back_repeats_the_picture(gimp: Gimp, daemon) -> None:
    markers = gimp.run(
        f"""
        def generate(label, **seed):
            image, background = new_image({W}, {H}, bytes({W} * {H} * 3))
            status, value, seconds = call(
                {GENERATE!r}, image, [background], prompt="a blue square", steps=2,
                address={daemon.address!r}, timeout=60.0, **seed,
            )
            mark(**{{label: [status, value]}})
            save_pixels(image.get_layers()[0], f"{{label}}.rgba")
            return value

        name = generate("random")
        generate("again", random_seed=False, seed=int(name.rsplit("(", 1)[1].rstrip(")")))
        generate("top", random_seed=False, seed={protocol.MAX_SEED})
        """
    ).checked()
    status, name = markers["random"]
    assert status == "success"
    # The daemon picked the seed and reported it; the layer name shows it, the argument takes it.
    seed = int(re.fullmatch(r"a blue square \((\d+)\)", name).group(1))
    assert 0 <= seed <= protocol.MAX_SEED
    assert markers["again"] == ["success", name]
    # The same request through the same code path twice: the same pixels, to the bit.
    assert gimp.host("again.rgba").read_bytes() == gimp.host("random.rgba").read_bytes()
    # Even the largest seed the daemon can report fits the argument.
    assert markers["top"] == ["success", layer_name("a blue square", protocol.MAX_SEED)]


def test_a_few_step_model_picked_by_name_gets_its_preset(gimp: Gimp, library_daemon) -> None:
    prompt = "a few-step fox in the snow"
    markers = gimp.run(
        f"""
        image, background = new_image({W}, {H}, bytes({W} * {H} * 3))
        status, value, seconds = call(
            {GENERATE!r}, image, [background], prompt={prompt!r}, model="tiny-sd-turbo",
            address={library_daemon.address!r}, timeout=120.0,
        )
        mark(result=[status, value])
        """
    ).checked()
    assert markers["result"][0] == "success"
    # Steps, guidance and sampler were left at "model default", so none was sent: the daemon
    # applied the model's own preset, as its saved copy says.
    saved = []
    for path in library_daemon.output_dir.rglob("*.png"):
        with Image.open(path) as image:
            parameters = image.text.get("parameters", "")
        if parameters.startswith(prompt):
            saved.append(parameters)
    assert len(saved) == 1, saved
    for part in ("Steps: 4,", "CFG scale: 0,", "Sampler: Euler a,", "Model: tiny-sd-turbo"):
        assert part in saved[0], saved[0]


def test_repaint_selection_changes_only_selected_pixels(gimp: Gimp, daemon) -> None:
    markers = gimp.run(
        f"""
        pattern = bytes(
            v for y in range({H}) for x in range({W})
            for v in ((x * 5) % 256, (y * 7) % 256, ((x + y) * 3) % 256)
        )
        image, background = new_image({W}, {H}, pattern)
        image.select_ellipse(Gimp.ChannelOps.REPLACE, 20, 12, 48, 36)
        save_selection(image, "repaint-mask.bin")
        export(image, "repaint-before.png")
        status, value, seconds = call(
            {REPAINT!r}, image, [background], prompt="a green blob", random_seed=False, seed=3,
            steps=6, strength=0.9, address={daemon.address!r}, timeout=60.0,
        )
        export(image, "repaint-after.png")
        mark(status=status, value=value, layers=layers(image))
        """
    ).checked()
    assert (markers["status"], markers["value"]) == ("success", layer_name("a green blob", 3))
    assert markers["layers"][0]["name"] == layer_name("a green blob", 3)
    # The layer covers the selection's bounds; its alpha is the selection mask.
    assert markers["layers"][0]["offsets"] == [20, 12]
    assert markers["layers"][0]["size"] == [48, 36]
    mask = gimp.host("repaint-mask.bin").read_bytes()
    before, after = rgba(gimp.host("repaint-before.png")), rgba(gimp.host("repaint-after.png"))
    unselected = [i for i, m in enumerate(mask) if m == 0]
    selected = [i for i, m in enumerate(mask) if m == 255]
    assert len(unselected) > 2000 and len(selected) > 1000
    moved = [i for i in unselected if before[i * 4 : i * 4 + 4] != after[i * 4 : i * 4 + 4]]
    assert moved == [], f"{len(moved)} unselected pixels changed"
    changed = sum(before[i * 4 : i * 4 + 3] != after[i * 4 : i * 4 + 3] for i in selected)
    assert changed > 0.8 * len(selected), f"only {changed}/{len(selected)} selected changed"


def test_generate_changes_only_an_elliptical_or_feathered_selection(gimp: Gimp, daemon) -> None:
    markers = gimp.run(
        f"""
        pattern = bytes(
            v for y in range({H}) for x in range({W})
            for v in ((x * 5) % 256, (y * 7) % 256, ((x + y) * 3) % 256)
        )
        for label in ("ellipse", "feathered"):
            image, background = new_image({W}, {H}, pattern)
            image.select_ellipse(Gimp.ChannelOps.REPLACE, 20, 12, 48, 36)
            if label == "feathered":
                Gimp.Selection.feather(image, 8.0)
            save_selection(image, f"{{label}}-mask.bin")
            export(image, f"{{label}}-before.png")
            status, value, seconds = call(
                {GENERATE!r}, image, [background], prompt="a green blob", random_seed=False,
                seed=3, steps=4, address={daemon.address!r}, timeout=60.0,
            )
            export(image, f"{{label}}-after.png")
            save_pixels(image.get_layers()[0], f"{{label}}-layer.rgba")
            mark(**{{label: {{"status": status, "layers": layers(image)}}}})
        """
    ).checked()
    for label in ("ellipse", "feathered"):
        assert markers[label]["status"] == "success"
        layer = markers[label]["layers"][0]
        mask = gimp.host(f"{label}-mask.bin").read_bytes()
        before = rgba(gimp.host(f"{label}-before.png"))
        after = rgba(gimp.host(f"{label}-after.png"))
        pixels = gimp.host(f"{label}-layer.rgba").read_bytes()  # the new layer's own RGBA
        (x0, y0), (width, height) = layer["offsets"], layer["size"]
        covered = [(x, y) for y in range(H) for x in range(W) if mask[y * W + x]]
        # The layer covers the selection's bounds, and its alpha is the selection mask there.
        assert (x0, y0) == (min(x for x, _ in covered), min(y for _, y in covered))
        assert (x0 + width, y0 + height) == (
            max(x for x, _ in covered) + 1,
            max(y for _, y in covered) + 1,
        )
        alpha = b"".join(mask[(y0 + y) * W + x0 :][:width] for y in range(height))
        assert pixels[3::4] == alpha
        unselected = [i for i, m in enumerate(mask) if m == 0]
        selected = [i for i, m in enumerate(mask) if m == 255]
        edge = [i for i, m in enumerate(mask) if 0 < m < 255]
        assert len(unselected) > 1500 and len(selected) > 300, label
        moved = [i for i in unselected if before[i * 4 : i * 4 + 4] != after[i * 4 : i * 4 + 4]]
        assert moved == [], f"{label}: {len(moved)} unselected pixels changed"
        changed = sum(before[i * 4 : i * 4 + 3] != after[i * 4 : i * 4 + 3] for i in selected)
        assert changed > 0.8 * len(selected), f"{label}: {changed}/{len(selected)} changed"
        if label == "ellipse":
            continue
        # A feathered edge blends: each pixel lies between what was there and the new layer.
        assert len(edge) > 300
        outside = 0
        for i in edge:
            x, y = i % W, i // W
            j = ((y - y0) * width + (x - x0)) * 4
            for c in range(3):
                low, high = sorted((before[i * 4 + c], pixels[j + c]))
                outside += not low - 1 <= after[i * 4 + c] <= high + 1
        assert outside == 0, f"{outside} edge channels are not a blend"
        partly = sum(before[i * 4 : i * 4 + 3] != after[i * 4 : i * 4 + 3] for i in edge)
        assert partly > 0.5 * len(edge)


class StalledDaemon:
    """Answers `hello` and accepts jobs, then never finishes them: a hung daemon."""

    def __init__(self) -> None:
        self.socket = zmq.Context.instance().socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        port = self.socket.bind_to_random_port("tcp://127.0.0.1")
        self.address = f"tcp://127.0.0.1:{port}"
        self.requests: list[dict] = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopping.is_set():
            if not self.socket.poll(100):
                continue
            peer, body = self.socket.recv_multipart()
            request = protocol.unpack(body)
            self.requests.append(request)
            answer = {"hello": "hello", "generate": "accepted"}.get(request["op"])
            if answer:
                event = protocol.event(answer, request["id"], position=0)
                self.socket.send_multipart([peer, protocol.pack(event)])

    def close(self) -> None:
        self.stopping.set()
        self.thread.join()
        self.socket.close()


@pytest.fixture
def stalled_daemon() -> Iterator[StalledDaemon]:
    stub = StalledDaemon()
    yield stub
    stub.close()


def test_errors_come_back_as_pdb_messages_within_the_timeout(
    gimp: Gimp, daemon, daemon_factory: Callable, stalled_daemon: StalledDaemon
) -> None:
    stopped = daemon_factory()
    stopped.stop()
    cases = {
        "stopped": {"address": stopped.address, "timeout": 30.0},
        "stalled": {"address": stalled_daemon.address, "timeout": 2.0},
        "unknown_model": {"address": daemon.address, "model": "no-such-model"},
        "refused": {"address": daemon.address, "scheduler": "no-such-sampler"},
        "bad_address": {"address": "localhost:7878"},
        "no_prompt": {"address": daemon.address, "prompt": "  "},
    }
    markers = gimp.run(
        f"""
        image, background = new_image({W}, {H}, bytes({W} * {H} * 3))
        for label, arguments in {cases!r}.items():
            arguments = {{"prompt": "a cat", "steps": 2, "timeout": 30.0, **arguments}}
            status, error, seconds = call({GENERATE!r}, image, [background], **arguments)
            mark(**{{label: {{"status": status, "error": error, "seconds": seconds}}}})
        mark(layers=len(image.get_layers()))
        """,
        timeout=90,
    ).checked()
    for case in markers.values():
        if isinstance(case, dict):
            assert case["error"].startswith("sdbridge: "), case
    stopped_case = markers["stopped"]
    assert stopped_case["status"] == "execution-error"
    assert stopped.address in stopped_case["error"] and "sdbridge serve" in stopped_case["error"]
    assert stopped_case["seconds"] < 10

    stalled = markers["stalled"]
    assert stalled["status"] == "execution-error"
    assert "within 2 s" in stalled["error"] and "cancelled" in stalled["error"]
    assert 2 <= stalled["seconds"] < 10
    job = next(r for r in stalled_daemon.requests if r["op"] == "generate")
    cancels = [r for r in stalled_daemon.requests if r["op"] == "cancel"]
    assert [r["job"] for r in cancels] == [job["id"]], "the timed-out job was not cancelled"

    # The caller's mistakes, found before anything is sent, in the session's words.
    assert markers["unknown_model"]["status"] == "calling-error"
    assert "no model “no-such-model”" in markers["unknown_model"]["error"]
    assert markers["no_prompt"]["status"] == "calling-error"
    assert markers["no_prompt"]["error"] == "sdbridge: Type a prompt first."
    assert markers["no_prompt"]["seconds"] < 2
    assert markers["bad_address"]["status"] == "calling-error"
    assert "tcp://" in markers["bad_address"]["error"]
    # What only the daemon knows to refuse: its words, as the job's view puts them.
    refused = markers["refused"]
    assert refused["status"] == "execution-error"
    assert refused["error"].startswith("sdbridge: The daemon refused the job: ")
    assert "no-such-sampler" in refused["error"]
    assert markers["layers"] == 1, "a failed call must not leave a layer behind"


def test_dialogs_build_under_xvfb_and_cancel_stops_the_job_on_the_daemon(
    gimp: Gimp, daemon
) -> None:
    markers = gimp.run(
        f"""
        plugin = dialog_plugin()
        from gi.repository import GLib, GObject, Gtk

        dialogs = {{}}
        for name in (plugin.GENERATE, plugin.REPAINT):
            procedure = Gimp.get_pdb().lookup_procedure(name)
            config = procedure.create_config()
            if name == plugin.REPAINT:  # what the Generate dialog saved wins over last values
                plugin.save_address("tcp://127.0.0.1:9")
                config.set_property("address", "tcp://127.0.0.1:8")
            dialog = plugin.build_dialog(procedure, config)
            show(dialog)
            prompt = dialog.get_widget("prompt", Gtk.TextView)
            control = dialog.get_widget("control", GObject.TYPE_NONE)
            kind = dialog.get_widget("control-kind", GObject.TYPE_NONE)
            dialogs[name] = {{
                "control": [type(control).__name__, control.get_mapped()],
                "kind": [type(kind).__name__, kind.get_mapped()],
                "title": dialog.get_title(),
                "prompt": type(prompt).__name__,
                "prompt_shown": prompt.get_mapped(),
                "address": config.get_property("address"),
                "strength": config.get_property("strength"),
            }}
            dialog.destroy()
        mark(dialogs=dialogs)

        session = plugin.Session({daemon.address!r})
        generation = session.submit({{"prompt": "a long job", "num_inference_steps": 150}})
        progress = plugin.ProgressDialog("Generate")
        cancel = progress.dialog.get_widget_for_response(Gtk.ResponseType.CANCEL)
        GLib.idle_add(cancel.clicked)
        try:
            plugin.follow(generation, {daemon.address!r}, 60, progress)
            outcome = "finished"
        except plugin.Cancelled:
            outcome = "cancelled"
        progress.close()
        view = generation.view
        mark(outcome=outcome, cancelled=[view.phase.value, view.message, view.is_error])

        fields = {{"prompt": "a short job", "num_inference_steps": 3, "seed": 1}}
        generation = session.submit({{**fields, "preview_every": 1}})
        progress = plugin.ProgressDialog("sdbridge: Generate")
        view = plugin.follow(generation, {daemon.address!r}, 60, progress)
        shown, bar = progress.label.get_text(), progress.bar.get_fraction()
        preview = progress.preview.get_pixbuf()
        mark(phase=view.phase.value, message=view.message, shown=shown, bar=bar)
        mark(preview=None if preview is None else [preview.get_width(), preview.get_height()])
        progress.close()
        session.close()
        """,
        display=True,
    ).checked()
    generate, repaint = markers["dialogs"][GENERATE], markers["dialogs"][REPAINT]
    assert (generate["title"], repaint["title"]) == (
        "sdbridge: Generate",
        "sdbridge: Repaint selection",
    )
    for info in (generate, repaint):
        assert info["prompt"] == "TextView" and info["prompt_shown"]
        # The control layer is picked from the image's layers, its kind from a list.
        assert info["control"] == ["DrawableChooser", True]
        assert info["kind"][1] is True, info["kind"]
    assert generate["address"] == protocol.DEFAULT_ADDRESS  # nothing saved yet
    assert repaint["address"] == "tcp://127.0.0.1:9"
    assert (generate["strength"], repaint["strength"]) == (1.0, 0.75)
    # The daemon confirmed the cancel (a job left behind unconfirmed would read as an error).
    assert markers["outcome"] == "cancelled"
    assert markers["cancelled"] == ["cancelled", "Cancelled; nothing was added.", False]
    # The window shows what the job's view says, up to the end.
    assert markers["phase"] == "finished" and markers["bar"] == 1.0
    assert markers["shown"] == markers["message"] and markers["shown"].startswith("Saved as ")
    assert markers["preview"] == [192, 192]  # the live preview, enlarged


def test_the_daemons_step_limit_bounds_the_dialog_and_a_call(
    gimp: Gimp, daemon_factory: Callable
) -> None:
    limited = daemon_factory("--max-steps", "40")
    absent = f"tcp://127.0.0.1:{free_port()}"
    with SilentDaemon() as silent:
        addresses = {"limited": limited.address, "absent": absent, "silent": silent.address}
        markers = gimp.run(
            f"""
            plugin = dialog_plugin()
            from gi.repository import GimpUi

            procedure = Gimp.get_pdb().lookup_procedure(plugin.GENERATE)
            for label, address in {addresses!r}.items():
                plugin.save_address(address)
                started = time.monotonic()
                dialog = plugin.build_dialog(procedure, procedure.create_config())
                seconds = time.monotonic() - started
                show(dialog)
                steps = dialog.get_widget("steps", GimpUi.LabelSpin)
                guidance = dialog.get_widget("guidance", GimpUi.LabelSpin)
                mark(**{{label: {{
                    "upper": steps.get_property("upper"),
                    "seconds": seconds,
                    "shown": [steps.get_spin_button().get_text(),
                              guidance.get_spin_button().get_text()],
                    "tooltip": steps.get_tooltip_text(),
                    "offered": [
                        dialog.get_widget(name, GimpUi.LabelEntry).get_tooltip_text()
                        for name in ("model", "scheduler")
                    ],
                }}}})
                dialog.destroy()
            mark(widest=plugin.MAX_STEPS_ARGUMENT)

            image, background = new_image({W}, {H}, bytes({W} * {H} * 3))
            status, error, seconds = call(
                {GENERATE!r}, image, [background], prompt="a cat", steps=41,
                address={limited.address!r},
            )
            mark(over=[status, error], layers=len(image.get_layers()))
            """,
            display=True,
        ).checked()
    print({label: markers[label]["seconds"] for label in addresses})  # for the record
    # The daemon's limits.max_steps is the widget's bound, and its model's defaults its hint.
    limited_dialog = markers["limited"]
    assert limited_dialog["upper"] == 40
    assert "20 steps, guidance 7.5" in limited_dialog["tooltip"]
    # Its models and samplers are offered by name.
    models, samplers = limited_dialog["offered"]
    assert models.startswith("Empty: its loaded model (") and "tiny-sd" in models
    assert samplers.startswith("Empty: the model's default.") and "Euler a" in samplers
    # Left unset, steps and guidance read as the model's, in words.
    assert limited_dialog["shown"] == ["model default", "model default"]
    # Without an answer the dialog opens at once with the argument's own range: no daemon at
    # all costs nothing, one that never answers costs the probe's short wait.
    assert markers["absent"]["upper"] == markers["silent"]["upper"] == markers["widest"]
    assert markers["absent"]["seconds"] < 1.0
    assert markers["silent"]["seconds"] < 2.5
    # A script asking for more is refused before anything is sent.
    assert markers["over"] == ["calling-error", "sdbridge: The steps must be between 1 and 40."]
    assert markers["layers"] == 1


def test_cancel_against_a_hung_daemon_returns_within_the_grace(
    gimp: Gimp, stalled_daemon: StalledDaemon
) -> None:
    with SilentDaemon() as silent:
        # One never answers at all (Cancel comes while the plug-in waits for hello); the other
        # takes the job but never confirms its cancel.
        addresses = {"silent": silent.address, "stalled": stalled_daemon.address}
        run = gimp.run(
            f"""
            import threading

            image, background = new_image({W}, {H}, bytes({W} * {H} * 3))
            for label, address in {addresses!r}.items():
                with open(f"{{WORK}}/profile/sdbridge.json", "w") as f:
                    json.dump({{"address": address}}, f)
                pressed = {{}}

                def ok_then_cancel(pressed=pressed):
                    pressed["ok"] = press_mnemonic("sdbridge: Generate", "o")
                    # The progress window has the same title: the next window of that name.
                    skip = (pressed["ok"],)
                    pressed["cancel"] = press_mnemonic("sdbridge: Generate", "c", skip=skip)
                    pressed["at"] = time.monotonic()

                presser = threading.Thread(target=ok_then_cancel)
                presser.start()
                status, value, seconds = call(
                    {GENERATE!r}, image, [background], run_mode=Gimp.RunMode.INTERACTIVE,
                    prompt="never finished", timeout=600.0,
                )
                returned = time.monotonic()
                presser.join()
                mark(**{{label: {{
                    "status": status,
                    "pressed": bool(pressed["ok"] and pressed["cancel"]),
                    "after_cancel": returned - pressed["at"],
                }}}})
            mark(layers=len(image.get_layers()))
            """,
            display=True,
            env={"GDK_CORE_DEVICE_EVENTS": "1"},
            timeout=120,
        )
        markers = run.checked()
    print({label: markers[label]["after_cancel"] for label in addresses})  # for the record
    for label in addresses:
        assert markers[label]["pressed"] and markers[label]["status"] == "cancel", label
    # Waiting for hello, Cancel lets go at once: nothing was sent.
    assert markers["silent"]["after_cancel"] < 1.0
    assert [r["op"] for r in silent.requests if r["op"] != "hello"] == []
    # A job on its way: the daemon is asked to cancel it and has the grace to confirm, no more.
    assert CANCEL_GRACE_S - 0.5 < markers["stalled"]["after_cancel"] < CANCEL_GRACE_S + 2
    job = next(r for r in stalled_daemon.requests if r["op"] == "generate")
    cancels = [r["job"] for r in stalled_daemon.requests if r["op"] == "cancel"]
    assert cancels == [job["id"]]
    assert markers["layers"] == 1


def test_interactive_run_asks_then_paints_with_the_saved_address(gimp: Gimp, daemon) -> None:
    run = gimp.run(
        f"""
        import threading

        with open(f"{{WORK}}/profile/sdbridge.json", "w") as f:
            json.dump({{"address": {daemon.address!r}}}, f)  # set in an earlier session
        image, background = new_image({W}, {H}, bytes({W} * {H} * 3))
        answers = {{}}
        for key in ("c", "o"):  # _Cancel, then _OK
            def answer(key=key):
                answers[key] = press_mnemonic("sdbridge: Generate", key)
            presser = threading.Thread(target=answer)
            presser.start()
            result = call(
                {GENERATE!r}, image, [background], run_mode=Gimp.RunMode.INTERACTIVE,
                prompt="asked for", random_seed=False, seed=21, steps=3,
            )
            presser.join()
            mark(**{{key: result[:2]}})
        mark(answers=answers, layers=layers(image))
        """,
        display=True,
        env={"GDK_CORE_DEVICE_EVENTS": "1"},
    )
    markers = run.checked()
    assert set(markers["answers"]) == {"c", "o"} and all(markers["answers"].values())
    assert markers["c"][0] == "cancel"  # the dialog's Cancel: nothing painted
    assert markers["o"] == ["success", layer_name("asked for", 21)]
    assert [layer["name"] for layer in markers["layers"]] == ["asked for (21)", "background"]
    # GIMP checks an interactive dialog's mnemonics and complains about clashes on stderr.
    # (It also reports the prompt boxes as lacking one: it looks before their titles exist.)
    assert "duplicate mnemonic" not in run.log


def test_a_style_from_the_shared_file_reaches_the_saved_parameters(gimp: Gimp, daemon) -> None:
    """The styles file that the Krita docker saves and `sdbridge generate --style` reads."""
    save_style(Style("flat", prompt="{prompt}, flat colours", num_inference_steps=2),
               gimp.host("styles.json"))  # fmt: skip
    markers = gimp.run(
        f"""
        image, background = new_image({W}, {H}, bytes({W} * {H} * 3))
        for label, style in (("styled", "flat"), ("unknown", "nope")):
            status, value, seconds = call(
                {GENERATE!r}, image, [background], prompt="a cat", style=style,
                address={daemon.address!r}, timeout=60.0,
            )
            mark(**{{label: [status, value]}})
        """,
        env={"SDBRIDGE_STYLES": gimp.inner("styles.json")},
    ).checked()
    assert markers["styled"] == ["success", markers["styled"][1]]
    assert markers["styled"][1].startswith("a cat, flat colours (")
    newest = max(daemon.output_dir.rglob("*.png"), key=lambda path: path.stat().st_mtime_ns)
    assert Image.open(newest).text["parameters"].startswith("a cat, flat colours\nSteps: 2,")
    status, error = markers["unknown"]
    assert status == "calling-error" and "no style “nope”" in error and "(styles: flat)" in error


def test_expand_enlarges_the_canvas_paints_the_margin_and_keeps_the_picture(
    gimp: Gimp, daemon_factory: Callable
) -> None:
    """The picture is the embedded model's own, so the seam can be measured against it."""
    tiny_daemon = daemon_factory(model=tiny.MODEL_DIR)
    stopped = daemon_factory()
    stopped.stop()
    prompt = "a small red circle at the top left on a blue background"
    margin_prompt = prompt  # the margin is part of the same picture
    markers = gimp.run(
        f"""
        image, background = new_image({W}, {H}, bytes({W} * {H} * 3))
        common = dict(random_seed=False, seed=3, timeout=120.0)
        call({GENERATE!r}, image, [background], address={tiny_daemon.address!r},
             prompt={prompt!r}, **common)
        common["prompt"] = {margin_prompt!r}
        export(image, "expand-before.png")
        failed = call({EXPAND!r}, image, [background], right=32, address={stopped.address!r},
                      **common)
        mark(failed=[failed[0], image.get_width(), image.get_height()])
        status, value, seconds = call({EXPAND!r}, image, [background], right=32,
                                      address={tiny_daemon.address!r}, **common)
        mark(status=status, value=value, size=[image.get_width(), image.get_height()],
             layers=layers(image))
        export(image, "expand-after.png")
        """,
        timeout=240,
    ).checked()
    # A job that fails gives the canvas its size back.
    assert markers["failed"] == ["execution-error", W, H]
    assert markers["status"] == "success", markers["value"]
    assert markers["size"] == [W + 32, H]
    added = [layer for layer in markers["layers"] if layer["name"] == markers["value"]]
    assert {"name": markers["value"], "offsets": [W, 0], "size": [32, H]} in added
    with Image.open(gimp.host("expand-before.png")) as image:
        before = image.convert("RGBA")
    with Image.open(gimp.host("expand-after.png")) as image:
        after = image.convert("RGBA")
    assert after.size == (W + 32, H)
    assert after.crop((0, 0, W, H)).tobytes() == before.tobytes(), "the picture is kept exactly"
    assert after.getextrema()[3] == (255, 255), "the margin is painted, nothing transparent"
    pixels = after.load()

    def step(x: int) -> float:
        """Mean colour difference between columns x - 1 and x."""
        return sum(
            abs(pixels[x, y][c] - pixels[x - 1, y][c]) for y in range(H) for c in range(3)
        ) / (H * 3)

    seam, inside = step(W), sum(step(x) for x in range(8, W - 8)) / (W - 16)
    print(f"expand seam: {seam:.2f} across the seam, {inside:.2f} inside the picture")
    assert seam <= 3 * inside + 6, (seam, inside)


def test_loras_several_images_and_the_refine_pass_reach_the_saved_parameters(
    gimp: Gimp, library_daemon
) -> None:
    markers = gimp.run(
        f"""
        image, background = new_image({W}, {H}, bytes({W} * {H} * 3))
        status, value, seconds = call(
            {GENERATE!r}, image, [background], prompt="a cat", loras="ink:0.5", images=2,
            scheduler="DPM++ 2M", steps=3, random_seed=False, seed=21,
            address={library_daemon.address!r}, timeout=60.0,
        )
        shown = [[layer.get_name(), layer.get_visible()] for layer in image.get_layers()]
        mark(several=[status, value, shown])
        big, background = new_image(192, 128, bytes(192 * 128 * 3))
        status, value, seconds = call(
            {GENERATE!r}, big, [background], prompt="a dog", refine_strength=0.3, steps=3,
            address={library_daemon.address!r}, timeout=120.0,
        )
        mark(refined=[status, value])
        """,
        timeout=240,
    ).checked()
    status, value, shown = markers["several"]
    assert (status, value) == ("success", "a cat (21)")
    # One layer per image, the first shown on top, the others hidden to pick from.
    assert shown == [["a cat (21)", True], ["a cat (22)", False], ["background", True]]
    saved = {
        path: Image.open(path).text["parameters"]
        for path in library_daemon.output_dir.rglob("*.png")
    }
    cats = [text for text in saved.values() if text.startswith("a cat <lora:ink:0.5>\n")]
    assert len(cats) >= 2 and all("Sampler: DPM++ 2M," in text for text in cats)
    assert markers["refined"][0] == "success"
    dogs = [text for text in saved.values() if text.startswith("a dog\n")]
    assert any("Hires upscale" in text for text in dogs), dogs


# --- Recent results ------------------------------------------------------------------------------

RECENT = "python-fu-sdbridge-recent"
TOKEN = "recent-token-for-the-gimp-tests-0123456789"
QUICK = {"num_inference_steps": 2, "width": 32, "height": 32}


def newest_number(client: Client) -> int:
    return client.results(limit=1)["results"][0]["number"]


def test_recent_results_places_the_newest_or_a_numbered_result_with_its_pixels(
    gimp: Gimp, daemon
) -> None:
    # Another program's result: a daemon without a token (loopback only) shows it to everyone.
    with Client(daemon.address) as client:
        job = client.generate(prompt="from another client", seed=9, num_inference_steps=2,
                              width=64, height=48)  # fmt: skip
        other = job.result(60)["images"][0]
        number = newest_number(client)
    markers = gimp.run(
        f"""
        procedure = Gimp.get_pdb().lookup_procedure({RECENT!r})
        mark(registered=[
            list(procedure.get_menu_paths()), procedure.get_menu_label(),
            [spec.name for spec in procedure.get_arguments()],
            [spec.name for spec in procedure.get_return_values()],
        ])
        image, background = new_image({W}, {H}, bytes([128, 128, 128]) * ({W} * {H}))
        address = {daemon.address!r}
        made = call({GENERATE!r}, image, [background], prompt="a gimp picture",
                    random_seed=False, seed=5, steps=2, address=address, timeout=60.0)
        save_pixels(image.get_layers()[0], "generated.rgba")
        # The top layer active, as after Generate: each result lands above it.
        newest = call({RECENT!r}, image, [image.get_layers()[0]], address=address)
        save_pixels(image.get_layers()[0], "newest.rgba")
        numbered = call({RECENT!r}, image, [image.get_layers()[0]], number={number},
                        address=address)
        save_pixels(image.get_layers()[0], "numbered.rgba")
        mark(made=made[:2], newest=newest[:2], numbered=numbered[:2], layers=layers(image))

        alone = call({RECENT!r}, None, [], number={number}, address=address)
        (opened,) = [i for i in Gimp.get_images() if i.get_id() != image.get_id()]
        save_pixels(opened.get_layers()[0], "alone.rgba")
        mark(alone=alone[:2], opened=[opened.get_width(), opened.get_height(), layers(opened)])
        """
    ).checked()
    menu, label, arguments, returns = markers["registered"]
    assert (menu, label, returns) == (["<Image>/Filters/sdbridge"], "Re_cent results...", ["layer"])
    assert [a for a in arguments if a != "num-drawables"] == [
        "run-mode", "image", "drawables", "number", "address"
    ]  # fmt: skip
    mine = layer_name("a gimp picture", 5)
    theirs = layer_name("from another client", 9)
    assert markers["made"] == ["success", mine]
    assert markers["newest"] == ["success", f"{mine} #1"]  # GIMP numbers a name in use
    assert markers["numbered"] == ["success", theirs]
    # At the image's top-left corner, at the result's own size, above the active layer.
    assert markers["layers"] == [
        {"name": theirs, "offsets": [0, 0], "size": [64, 48]},
        {"name": f"{mine} #1", "offsets": [0, 0], "size": [W, H]},
        {"name": mine, "offsets": [0, 0], "size": [W, H]},
        {"name": "background", "offsets": [0, 0], "size": [W, H]},
    ]
    # The pictures themselves, read back from the daemon's files, bit for bit.
    assert gimp.host("newest.rgba").read_bytes() == gimp.host("generated.rgba").read_bytes()
    assert gimp.host("numbered.rgba").read_bytes() == other["data"]
    # Without an image, the result opens as a new image of its size.
    assert markers["alone"] == ["success", theirs]
    assert markers["opened"] == [64, 48, [{"name": theirs, "offsets": [0, 0], "size": [64, 48]}]]
    assert gimp.host("alone.rgba").read_bytes() == other["data"]


def test_on_a_daemon_with_a_token_recent_results_lists_only_this_users_results(
    gimp: Gimp, daemon_factory: Callable
) -> None:
    guarded = daemon_factory(token=TOKEN)
    with Client(guarded.address, token=TOKEN, session=new_session_key()) as stranger:
        stranger.generate(prompt="a stranger's picture", seed=2, **QUICK).result(60)
        strangers = newest_number(stranger)
    markers = gimp.run(
        f"""
        image, background = new_image({W}, {H}, bytes({W} * {H} * 3))
        address = {guarded.address!r}
        nothing = call({RECENT!r}, image, [background], address=address)
        made = call({GENERATE!r}, image, [background], prompt="my own picture",
                    random_seed=False, seed=11, steps=2, address=address, timeout=60.0)
        # Every call is a plug-in process, and a connection, of its own.
        other, other_background = new_image({W}, {H}, bytes({W} * {H} * 3))
        mine = call({RECENT!r}, other, [other_background], address=address)
        theirs = call({RECENT!r}, other, [other_background], number={strangers},
                      address=address)
        mark(nothing=nothing[:2], made=made[:2], mine=mine[:2], theirs=theirs[:2],
             layers=[len(image.get_layers()), len(other.get_layers())])
        """,
        env={"SDBRIDGE_TOKEN": TOKEN},
    ).checked()
    status, error = markers["nothing"]
    assert status == "execution-error"
    assert error == (
        f"sdbridge: the daemon at {guarded.address} has no results to show: it lists the last "
        "500 images it saved, and a daemon with a token only what this user's editors made"
    )
    assert markers["made"][0] == "success"
    # GIMP's own result, made on another connection, is listed: the same session key.
    assert markers["mine"] == ["success", layer_name("my own picture", 11)]
    status, error = markers["theirs"]
    assert status == "calling-error"
    assert f"lists no result {strangers} for this user" in error
    assert markers["layers"] == [2, 2]  # a background and one new layer each: none for errors
    # The key is the user's (the sdbridge config folder): Krita and the CLI see GIMP's result.
    key = gimp.host(".config/sdbridge/session-key").read_text().strip()
    with Session(guarded.address, TOKEN, session_key=key) as session:
        assert [r.prompt for r in session.results().results] == ["my own picture"]


def test_recent_results_errors_name_the_reason_and_add_nothing(gimp: Gimp, daemon) -> None:
    with Client(daemon.address) as client:
        done = client.generate(prompt="soon deleted", seed=4, **QUICK).result(60)
        number = newest_number(client)
    path = Path(done["images"][0]["path"])
    wait_until(lambda: path.read_bytes()[25] == 2)  # compressed (RGB): the daemon is done with it
    path.unlink()
    absent = f"tcp://127.0.0.1:{free_port()}"
    with OldDaemon() as old:
        cases = {
            "deleted": {"address": daemon.address, "number": number},
            "unlisted": {"address": daemon.address, "number": number + 1000},
            "absent": {"address": absent},
            "old": {"address": old.address},
        }
        markers = gimp.run(
            f"""
            image, background = new_image({W}, {H}, bytes({W} * {H} * 3))
            for label, arguments in {cases!r}.items():
                status, error, seconds = call({RECENT!r}, image, [background], **arguments)
                mark(**{{label: [status, error, seconds]}})
            mark(layers=len(image.get_layers()))
            """
        ).checked()
    assert markers["deleted"][:2] == [
        "execution-error",
        f"sdbridge: the file of result {number} was moved or deleted: {path}",
    ]
    status, error, _ = markers["unlisted"]
    assert status == "calling-error" and f"lists no result {number + 1000} " in error
    status, error, seconds = markers["absent"]
    assert status == "execution-error" and absent in error and "sdbridge serve" in error
    assert seconds < 10
    status, error, _ = markers["old"]
    assert status == "execution-error"
    assert error == (
        f"sdbridge: the daemon at {old.address} cannot list its results (its sdbridge is older "
        "than this editor's); update it and restart `sdbridge serve`"
    )
    assert markers["layers"] == 1


def test_the_recent_results_dialog_pages_back_and_places_the_picked_result(
    gimp: Gimp, daemon
) -> None:
    prompts = ["an <old> & odd one", "a middle one", "the newest one"]
    with Client(daemon.address) as client:
        made = [
            client.generate(prompt=prompt, seed=seed, **QUICK).result(60)["images"][0]
            for seed, prompt in enumerate(prompts, 1)
        ]
    run = gimp.run(
        f"""
        import threading

        plugin = dialog_plugin()
        session = plugin.connect({daemon.address!r})
        dialog = plugin.RecentDialog("Recent", session, plugin.list_results(session, limit=2))
        show(dialog.dialog)
        rows = lambda: [[row[1], row[2], row[3]] for row in dialog.store]
        first, older = rows(), dialog.older.get_sensitive()
        dialog.older.clicked()
        thumbnail = dialog.store[0][0]
        mark(first=first, older=older, rows=rows(), chosen=dialog.chosen(),
             thumbnail=[thumbnail.get_width(), thumbnail.get_height()])
        dialog.dialog.destroy()
        session.close()

        # From the menu: the newest is picked already; Cancel places nothing, OK places it.
        plugin.save_address({daemon.address!r})
        image, background = new_image({W}, {H}, bytes({W} * {H} * 3))
        answers = {{}}
        for key in ("c", "o"):
            def answer(key=key):
                answers[key] = press_mnemonic("sdbridge: Recent results", key)
            presser = threading.Thread(target=answer)
            presser.start()
            result = call({RECENT!r}, image, [background], run_mode=Gimp.RunMode.INTERACTIVE)
            presser.join()
            mark(**{{key: result[:2]}})
        mark(answers=answers, layers=[layer["name"] for layer in layers(image)])
        """,
        display=True,
        env={"GDK_CORE_DEVICE_EVENTS": "1"},
    )
    markers = run.checked()
    newest, middle, oldest = made[::-1]
    # Newest first, two to a page here; Older… adds the next page below them.
    assert markers["older"]
    assert markers["rows"][:2] == markers["first"]
    numbers = [number for _, _, number in markers["rows"]]
    assert numbers == sorted(numbers, reverse=True) and len(numbers) >= 3
    texts = [text for text, _, _ in markers["rows"][:3]]
    tooltips = [tooltip for _, tooltip, _ in markers["rows"][:3]]
    assert texts[0].startswith("the newest one (seed 3, 32x32)\n<small>#")
    assert texts[1].startswith("a middle one (seed 2, 32x32)\n<small>#")
    # The prompt is the artist's text, not markup; the A1111 parameters are the tooltip.
    assert texts[2].startswith("an &lt;old&gt; &amp; odd one (seed 1, 32x32)\n")
    assert tooltips[2] == html.escape(oldest["parameters"], quote=False)
    assert tooltips[0] == html.escape(newest["parameters"], quote=False)
    assert markers["chosen"] == numbers[0]  # the newest, until the artist picks another
    assert markers["thumbnail"] == [96, 96]
    assert set(markers["answers"]) == {"c", "o"} and all(markers["answers"].values())
    assert markers["c"][0] == "cancel"
    assert markers["o"] == ["success", layer_name("the newest one", 3)]
    assert markers["layers"] == [layer_name("the newest one", 3), "background"]


def test_the_control_layer_steers_and_is_no_part_of_the_picture_repaint_starts_from(
    gimp: Gimp, daemon
) -> None:
    """Repaint sends the visible pixels around the selection: without the control layer, which
    goes along on its own, cut to the same region. A layer of another image is refused."""
    markers = gimp.run(
        f"""
        plugin = load_plugin_module()
        image, background = new_image({W}, {H}, bytes([200, 30, 30]) * ({W} * {H}))
        control = Gimp.Layer.new(image, "scribble", 20, 10, Gimp.ImageType.RGBA_IMAGE, 100.0,
                                 Gimp.LayerMode.NORMAL)
        image.insert_layer(control, None, 0)
        control.set_offsets(30, 20)
        buffer = control.get_buffer()
        buffer.set(Gegl.Rectangle.new(0, 0, 20, 10), "R'G'B'A u8", bytes([255] * 4 * 200))
        buffer.flush()
        image.select_rectangle(Gimp.ChannelOps.REPLACE, 24, 16, 40, 24)
        settings = plugin.Settings("a blob", strength=0.5)
        job_plan, rgba = plugin.plan(image, plugin.Mode.REPAINT, settings, control)
        layer = plugin.drawable_pixels(control, job_plan.bounds)
        b = job_plan.bounds
        mark(bounds=[b.x, b.y, b.width, b.height], colours=sorted(set(rgba[i:i + 4] for i in
             range(0, len(rgba), 4))) == [bytes([200, 30, 30, 255])],
             opaque=sum(1 for a in layer[3::4] if a == 255), visible=control.get_visible(),
             undo=image.undo_is_enabled())
        other, other_background = new_image(8, 8, bytes(8 * 8 * 3))
        status, value, seconds = call({REPAINT!r}, image, [background], prompt="a blob",
                                      control=other_background, address={daemon.address!r})
        mark(other=[status, value])
        status, value, seconds = call({REPAINT!r}, image, [background], prompt="a blob",
                                      control=control, control_kind="canny", steps=2,
                                      address={daemon.address!r}, timeout=60.0)
        mark(unfitting=[status, value])
        """
    ).checked()
    x, y, width, height = markers["bounds"]
    assert x <= 24 and y <= 16 and width >= 40 and height >= 24  # the selection and context
    assert markers["colours"] is True, "the control layer's white is no part of the picture"
    assert markers["opaque"] == 200, "the whole scribble, cut to the job's region"
    assert markers["visible"] is True and markers["undo"] is True
    assert markers["other"][0] == "calling-error"
    assert "the control layer must be one of the image's own" in markers["other"][1]
    # The session's daemon has no ControlNet for its model, and says so.
    status, error = markers["unfitting"]
    assert status == "execution-error" and "no listed ControlNet fits model" in error


def test_a_scribble_on_the_control_layer_puts_the_embedded_models_object_there(
    gimp: Gimp, daemon_factory: Callable
) -> None:
    """The embedded model and its ControlNet through the PDB, as the dialog runs it: a blob on
    a transparent layer at the bottom left of a 512x320 image is where the red circle is
    painted; without the control the same seed paints it elsewhere."""
    tiny_daemon = daemon_factory(model=tiny.MODEL_DIR)
    width, height, box = 512, 320, (60, 150, 200, 290)
    region = ellipse(width, height, box)
    left, top, right, bottom = box
    blob = np.zeros((bottom - top, right - left, 4), np.uint8)
    blob[region[top:bottom, left:right]] = 255
    markers = gimp.run(
        f"""
        image, background = new_image({width}, {height}, bytes({width} * {height} * 3))
        control = Gimp.Layer.new(image, "scribble", {right - left}, {bottom - top},
                                 Gimp.ImageType.RGBA_IMAGE, 100.0, Gimp.LayerMode.NORMAL)
        image.insert_layer(control, None, 0)
        control.set_offsets({left}, {top})
        buffer = control.get_buffer()
        buffer.set(Gegl.Rectangle.new(0, 0, {right - left}, {bottom - top}), "R'G'B'A u8",
                   bytes.fromhex({blob.tobytes().hex()!r}))
        buffer.flush()
        common = dict(prompt="a red circle on a blue background", random_seed=False, seed=11,
                      address={tiny_daemon.address!r}, timeout=120.0)
        for label, steering in (("steered", control), ("plain", None)):
            status, value, seconds = call({GENERATE!r}, image, [background], control=steering,
                                          **common)
            mark(**{{label: [status, value]}})
            control.set_visible(False)  # the picture alone, as the new layer shows it
            export(image, label + ".png")
            image.remove_layer(next(x for x in image.get_layers() if x.get_name() == value))
            control.set_visible(True)
        """,
        timeout=300,
    ).checked()
    overlaps = {}
    for label in ("steered", "plain"):
        assert markers[label][0] == "success", markers[label]
        with Image.open(gimp.host(f"{label}.png")) as image:
            overlaps[label] = scribble_overlap(np.asarray(image.convert("RGB")), region, (160, 104))
    saved = sorted(tiny_daemon.output_dir.rglob("*.png"), key=lambda path: path.stat().st_mtime_ns)
    steered, plain = (Image.open(path).text["parameters"] for path in saved[-2:])
    print(f"GIMP scribble overlap: {overlaps}")
    assert "Module: scribble, Model: sdbridge-tiny-scribble, Weight: 1" in steered
    assert "ControlNet" not in plain
    assert overlaps["steered"] >= 0.5 and overlaps["plain"] <= overlaps["steered"] - 0.25
