"""The sdbridge docker inside the real Krita, against a real daemon serving a small pipeline."""

from __future__ import annotations

import io
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import SilentDaemon, TcpProxy, ellipse, scribble_overlap, wait_until
from PIL import Image

from sdbridge import tiny
from sdbridge.editor.canvas import Bounds, Extent, job_bounds
from sdbridge.editor.config import SESSION_KEY_FILE, session_key
from sdbridge.editor.session import CANCEL_GRACE_S, Result, Session
from sdbridge.editor.styles import load_styles
from sdbridge.wire.client import Client, new_session_key

pytestmark = pytest.mark.krita

SCREENSHOT = Path(__file__).parents[2] / "docs" / "images" / "krita.png"
FILL = (50, 100, 200, 255)  # BGRA of the test canvases' background
LIVE_LAYER = "state['doc'].rootNode().childNodes()[-1]"  # on top while live mode is on
# Records every job the docker sends, as (fields, Generation), in state['sent'].
RECORD_JOBS = """
connection = dock().model._connection
sent = state['sent'] = []
def submit(fields, on_view, real=type(connection).submit.__get__(connection)):
    sent.append((fields, real(fields, on_view)))
    return sent[-1][1]
connection.submit = submit
"""
STOP_RECORDING = "del dock().model._connection.submit"


@pytest.fixture
def doc(krita):
    """A fresh document per test; the docker (and its connection) stays for the session."""
    yield krita
    krita.run("close_documents()")


def new_document(krita, width: int, height: int) -> list:
    krita.run(f"new_document({width}, {height}, {list(FILL)}); record(dock().model)")
    return krita.eval("layers()")


def generate(krita, prompt: str, steps: int | None = 4, timeout: float = 60.0, **widgets) -> list:
    """Fills the docker like an artist would, presses Generate, waits for the job to end.
    `steps` None leaves the steps at "model default"."""
    widgets["steps"] = steps or 0  # the spin box's minimum reads "model default"
    setters = "".join(f"dock().{name}.setValue({value})\n" for name, value in widgets.items())
    krita.run(f"dock().prompt.setPlainText({prompt!r})\n{setters}")
    started = krita.eval("[dock().generate.click(), dock().model.job is not None][1]")
    if started:
        krita.wait_for("dock().model.job is None", timeout)
    return krita.eval("layers()")


def pixels(krita, node: str, rect: list[int]) -> bytes:
    x, y, w, h = rect
    return bytes.fromhex(krita.eval(f"bytes({node}.pixelData({x}, {y}, {w}, {h})).hex()"))


def newest_output(daemon) -> Image.Image:
    """The PNG the daemon saved last: the job's image exactly as it was sent."""
    return Image.open(max(daemon.output_dir.rglob("*.png"), key=lambda p: p.stat().st_mtime_ns))


def as_bgra(image: Image.Image, box: tuple[int, int, int, int]) -> bytes:
    r, g, b, a = image.convert("RGBA").crop(box).split()
    return Image.merge("RGBA", (b, g, r, a)).tobytes()


def test_docker_loads_and_lists_the_daemons_models(krita, daemon):
    assert krita.eval("dock() is not None and dock().windowTitle()") == "sdbridge"
    # The session's kritarc names the daemon: the docker starts with that address.
    assert krita.eval("dock().address.text()") == daemon.address
    krita.wait_for("'Connected' in dock().connection.text()", timeout=30)
    krita.wait_for("dock().models.count() > 0", timeout=30)
    hello = krita.eval("[dock().models.itemText(i) for i in range(dock().models.count())]")
    expected = _daemon_hello(daemon)
    assert hello == expected["models"]
    assert krita.eval("dock().models.currentText()") == expected["model"]
    samplers = krita.eval("[dock().scheduler.itemText(i) for i in range(dock().scheduler.count())]")
    assert samplers == ["model default", *expected["schedulers"]]
    # Until the artist changes them, steps, guidance and sampler are the model's own.
    shown = krita.eval(
        "[dock().steps.lineEdit().text(), dock().guidance.lineEdit().text(),"
        " dock().scheduler.currentText(), dock().model.steps, dock().model.guidance_scale,"
        " dock().model.scheduler, dock().steps.toolTip()]"
    )
    assert shown[:6] == ["model default"] * 3 + [None] * 3
    assert shown[6] == "model default: 20 steps, guidance 7.5"


def test_the_docker_shows_connection_prompt_and_message_without_scrolling(krita):
    """In Krita's default window the docker shares its column with others: what an artist
    needs at every job must be in view, not below the fold of a scroll area."""
    krita.wait_for("dock().isVisible()", timeout=10)
    krita.run("dock().model.message_changed.emit('A message for the artist.', False)")
    shown = krita.eval(
        """{name: [w.visibleRegion().boundingRect().getRect(), w.rect().getRect()]
        for name, w in [("connection", dock().connection), ("prompt", dock().prompt),
                        ("generate", dock().generate), ("cancel", dock().cancel),
                        ("message", dock().message)]}"""
    )
    for name, (visible, whole) in shown.items():
        assert visible == whole and whole[3] > 0, f"{name} is not wholly in view: {shown}"


def test_a_few_step_model_picked_in_the_docker_runs_its_preset(doc, daemon, library_daemon):
    new_document(doc, 64, 64)
    try:
        doc.connect(library_daemon.address)
        doc.wait_for("dock().models.findText('tiny-sd-turbo') >= 0", timeout=30)
        doc.run("dock().models.setCurrentText('tiny-sd-turbo')")
        assert doc.eval("dock().steps.toolTip()") == ("model default: 4 steps, guidance 0, Euler a")
        layers = generate(doc, "a red circle", steps=None)
        assert "Added" in doc.eval("dock().message.text()"), layers
        parameters = newest_output(library_daemon).text["parameters"]
    finally:
        doc.connect(daemon.address)
    assert "Steps: 4," in parameters and "CFG scale: 0," in parameters
    assert "Sampler: Euler a" in parameters and "Model: tiny-sd-turbo" in parameters
    assert doc.eval("state['seen']['progress']")[-2] == [4, 4]


def test_sampler_loras_and_a_style_reach_the_saved_parameters(
    doc, daemon, library_daemon, krita_profile
):
    new_document(doc, 64, 64)
    try:
        doc.connect(library_daemon.address)
        doc.wait_for("dock().lora_choice.findText('ink') >= 0", timeout=30)
        doc.run(
            """
            dock().scheduler.setCurrentText('DPM++ 2M')
            dock().lora_choice.setCurrentText('ink'); dock().lora_weight.setValue(0.5)
            dock().findChild(QPushButton, 'sdbridge_add_lora').click()
            dock().model.save_style('ink style', '{prompt}, ink drawing')
            """
        )
        assert doc.eval("dock().style.currentText()") == "ink style"
        assert doc.eval("dock().loras.item(0).text()") == "ink  (0.5)"
        generate(doc, "a cat", steps=3)
        assert "Added" in doc.eval("dock().message.text()")
        parameters = newest_output(library_daemon).text["parameters"]
    finally:
        doc.run(
            "dock().model.loras = []; dock().loras.clear(); dock().style.setCurrentIndex(0);"
            " dock().scheduler.setCurrentIndex(0)"
        )
        doc.connect(daemon.address)
    assert parameters.startswith("a cat, ink drawing <lora:ink:0.5>\n")
    assert "Sampler: DPM++ 2M," in parameters and "Steps: 3," in parameters
    # The style is in the file that the GIMP plug-in and the CLI read too.
    saved = load_styles(krita_profile / "config" / "sdbridge" / "styles.json")
    assert saved["ink style"].prompt == "{prompt}, ink drawing"
    assert saved["ink style"].scheduler == "DPM++ 2M"


def test_generate_fills_the_transparent_margin_and_keeps_the_picture_exactly(
    doc, daemon, daemon_factory
):
    """Expand: after Image > Canvas Size the new margin is transparent; Generate paints it, the
    old pixels stay exactly as they were, and the seam is no sharper than the picture itself."""
    tiny_daemon = daemon_factory(model=tiny.MODEL_DIR)
    width, height, margin = 128, 96, 32
    new_document(doc, width, height)
    prompt = "a small red circle at the top left on a blue background"
    try:
        doc.connect(tiny_daemon.address)
        doc.run("dock().fixed_seed.setChecked(True); dock().seed.setText('3')")
        generate(doc, prompt, steps=None)
        before = pixels(doc, "state['doc']", [0, 0, width, height])
        # Krita's Background layer grows in its own colour; a picture on a layer of its own
        # (a transparent background) grows transparent, as after Image > Canvas Size.
        doc.run(
            "[n.remove() for n in state['doc'].rootNode().childNodes() if n.name() == 'Background']"
            f"; state['doc'].resizeImage(0, 0, {width + margin}, {height})"
            "; state['doc'].waitForDone(); state['doc'].refreshProjection()"
            "; state['doc'].waitForDone()"
        )
        wide = pixels(doc, "state['doc']", [0, 0, width + margin, height])
        assert set(wide[width * 4 + 3 :: (width + margin) * 4]) == {0}, "a transparent margin"
        layers = generate(doc, prompt, steps=None)  # the margin is part of the same picture
        after = pixels(doc, "state['doc']", [0, 0, width + margin, height])
    finally:
        doc.run("dock().fixed_seed.setChecked(False)")
        doc.connect(daemon.address)
    assert "Added" in doc.eval("dock().message.text()")
    assert layers[-1][2][:2] == [width, 0], "the new layer starts at the margin"
    stride = (width + margin) * 4
    for y in range(height):
        old = before[y * width * 4 : (y + 1) * width * 4]
        assert after[y * stride : y * stride + width * 4] == old, f"row {y} of the picture changed"
    assert set(after[3::4]) == {255}, "the margin is painted, nothing stays transparent"

    def step(x: int) -> float:
        """Mean colour difference between columns x - 1 and x (BGRA, alpha left out)."""
        total = 0
        for y in range(height):
            for c in range(3):
                total += abs(after[y * stride + x * 4 + c] - after[y * stride + (x - 1) * 4 + c])
        return total / (height * 3)

    seam, untouched = step(width), sum(step(x) for x in range(8, width - 8)) / (width - 16)
    print(f"expand seam: {seam:.2f} across the seam, {untouched:.2f} inside the picture")
    assert seam <= 3 * untouched + 6, (seam, untouched)


def test_a_limit_changed_on_the_daemon_changes_the_widget_range(krita, daemon, daemon_factory):
    assert krita.eval("[dock().steps.maximum(), dock().images.maximum()]") == [150, 8]
    own = daemon_factory("--max-steps", "40", "--max-images", "3")
    try:
        krita.connect(own.address)
        krita.wait_for("dock().steps.maximum() == 40 and dock().images.maximum() == 3")
    finally:
        krita.connect(daemon.address)
    krita.wait_for("dock().steps.maximum() == 150 and dock().images.maximum() == 8")


def test_cancel_against_a_daemon_that_never_answers_frees_generate_within_its_bound(doc, daemon):
    new_document(doc, 64, 64)
    try:
        with SilentDaemon() as silent:
            doc.connect(silent.address)
            doc.run("dock().prompt.setPlainText('into the void'); dock().generate.click()")
            assert doc.eval("dock().model.job is not None and dock().cancel.isEnabled()")
            wait_until(lambda: "generate" in [r["op"] for r in silent.requests])
            started = time.monotonic()
            doc.run("dock().cancel.click()")
            doc.wait_for("dock().model.job is None", timeout=CANCEL_GRACE_S + 5)
            waited = time.monotonic() - started
            assert doc.eval("dock().generate.isEnabled()")
            assert "did not confirm the cancel" in doc.eval("dock().message.text()")
            assert "cancel" in [r["op"] for r in silent.requests]
    finally:
        doc.connect(daemon.address)
    assert waited < CANCEL_GRACE_S + 2


def test_generate_without_selection_adds_one_canvas_sized_layer(doc, daemon):
    before = new_document(doc, 96, 64)
    after = generate(doc, "a red circle on a blue sky", steps=6)
    assert len(after) == len(before) + 1
    name, kind, bounds = after[-1]
    assert kind == "paintlayer" and bounds == [0, 0, 96, 64]
    assert name.startswith("a red circle on a blue sky (") and name.endswith(")")
    layer = pixels(doc, "state['doc'].rootNode().childNodes()[-1]", [0, 0, 96, 64])
    assert set(layer[3::4]) == {255}, "the layer must be opaque everywhere"
    assert len({layer[i : i + 3] for i in range(0, len(layer), 4)}) > 10, "a real picture"
    assert layer == as_bgra(newest_output(daemon), (0, 0, 96, 64)), "the daemon's pixels"
    seen = doc.eval("state['seen']")
    assert [6, 6] in seen["progress"] and seen["previews"] >= 1
    assert doc.eval("dock().progress.isTextVisible()") is False  # idle again
    assert "Added" in seen["messages"][-1][0]
    # One Ctrl+Z takes the whole result away.
    doc.run("app.action('edit_undo').trigger()")
    doc.wait_for(f"len(layers()) == {len(before)}", timeout=10)


def test_selection_changes_only_the_selected_pixels(doc, daemon):
    width, height, rect, notch = 128, 96, [40, 30, 32, 24], [56, 42, 16, 12]
    before = new_document(doc, width, height)
    original = pixels(doc, "state['doc']", [0, 0, width, height])
    # An L shape: the selection's bounds hold pixels that are not selected.
    doc.run(
        f"s = Selection(); s.select(*{rect}, 255); cut = Selection(); cut.select(*{notch}, 255)\n"
        "s.subtract(cut); state['doc'].setSelection(s)"
    )
    after = generate(doc, "a small house")
    added = [layer for layer in after if layer not in before]
    assert len(added) == 1 and added[0][1] == "paintlayer"
    assert added[0][2] == rect, "the result is placed exactly over the selection"
    # The daemon painted the selection plus context; the layer holds the selection's part.
    job = job_bounds(Extent(width, height), Bounds(*rect))
    saved = as_bgra(newest_output(daemon), (0, 0, job.width, job.height))
    layer = pixels(doc, "state['doc'].rootNode().childNodes()[-1]", rect)
    for y in range(rect[3]):
        for x in range(rect[2]):
            i = (y * rect[2] + x) * 4
            if _inside(notch, rect[0] + x, rect[1] + y):
                assert layer[i + 3] == 0, "an unselected pixel of the layer is transparent"
            else:
                j = ((rect[1] + y - job.y) * job.width + rect[0] + x - job.x) * 4
                assert layer[i : i + 4] == saved[j : j + 4], f"layer pixel {x},{y}"
    merged = pixels(doc, "state['doc']", [0, 0, width, height])
    changed = 0
    for y in range(height):
        for x in range(width):
            i = (y * width + x) * 4
            if _inside(rect, x, y) and not _inside(notch, x, y):
                changed += merged[i : i + 4] != original[i : i + 4]
            else:
                assert merged[i : i + 4] == original[i : i + 4], f"pixel {x},{y} outside changed"
    assert changed > (32 * 24 - 16 * 12) // 2, "most of the selection is repainted"


def test_strength_below_100_repaints_the_canvas(doc, daemon):
    """Strength 100 % paints from scratch; lower sends the canvas along as the init image, which
    the daemon records as A1111's "Denoising strength" in the PNG it saves."""
    new_document(doc, 64, 64)
    recorded = []
    try:
        for strength in (100, 30):
            generate(doc, "a blue lake", steps=10, strength=strength)
            recorded.append(newest_output(daemon).text["parameters"])
    finally:
        doc.run("dock().strength.setValue(100)")
    assert "Denoising strength" not in recorded[0]
    assert "Denoising strength: 0.3" in recorded[1]
    assert recorded[1].startswith("a blue lake")


def test_several_images_are_picked_from_the_history_and_applied_where_painted(doc, daemon):
    before = new_document(doc, 64, 64)
    doc.run("dock().fixed_seed.setChecked(True); dock().seed.setText('11')")
    try:
        generate(doc, "three apples", images=2)
    finally:
        doc.run("dock().fixed_seed.setChecked(False); dock().images.setValue(1)")
    # Nothing dumped on the canvas: the first image shows on a preview layer until applied.
    assert [layer[0] for layer in doc.eval("layers()")] == [
        *[layer[0] for layer in before],
        "sdbridge preview",
    ]
    history = doc.eval(
        "[(dock().history.item(i).data(Qt.UserRole), dock().history.item(i).toolTip())"
        " for i in range(dock().history.count())]"
    )
    assert len(history) >= 2
    # The newest job first, its images in order: image i has seed + i.
    (first, first_text), (second, second_text) = history[0], history[1]
    assert "Seed: 11," in first_text and "Seed: 12," in second_text
    doc.run(f"dock().history.setCurrentRow(1); dock().model.show_item({second})")
    shown = pixels(doc, "state['doc'].rootNode().childNodes()[-1]", [0, 0, 64, 64])
    doc.run("dock().apply.click()")
    after = doc.eval("layers()")
    assert after == [*before, ["three apples (12)", "paintlayer", [0, 0, 64, 64]]]
    assert pixels(doc, "state['doc'].rootNode().childNodes()[-1]", [0, 0, 64, 64]) == shown
    assert shown == as_bgra(Image.open(_saved(daemon, "Seed: 12,")), (0, 0, 64, 64))
    assert doc.eval("dock().reuse_seed.isEnabled()")
    # Use settings: the prompt, the seed and the parameters back in the panel.
    doc.run(
        "dock().prompt.setPlainText('something else'); dock().steps.setValue(9);"
        " dock().history.setCurrentRow(0); dock().use_settings.click()"
    )
    assert doc.eval(
        "[dock().prompt.toPlainText(), dock().fixed_seed.isChecked(), dock().seed.text(),"
        " dock().steps.value(), dock().model.steps]"
    ) == ["three apples", True, "11", 4, 4]
    assert first != second
    doc.run("dock().fixed_seed.setChecked(False)")


def _saved(daemon, text: str) -> Path:
    """The daemon's newest PNG whose parameters contain `text`."""
    for path in sorted(daemon.output_dir.rglob("*.png"), key=lambda p: -p.stat().st_mtime_ns):
        if text in Image.open(path).text["parameters"]:
            return path
    raise AssertionError(f"no saved image with {text!r}")


def test_cancel_during_a_job_adds_nothing_and_the_next_job_works(doc):
    before = new_document(doc, 64, 64)
    # 3 x 150 steps: the job cannot finish between seeing its progress and pressing Cancel.
    doc.run("dock().prompt.setPlainText('a slow one'); dock().steps.setValue(150)")
    doc.run("dock().images.setValue(3); dock().generate.click(); dock().images.setValue(1)")
    doc.wait_for("any(step >= 2 for step, total in state['seen']['progress'])", timeout=30)
    assert doc.eval("[dock().cancel.isEnabled(), dock().cancel.click()][0]")
    doc.wait_for("dock().model.job is None", timeout=30)
    diagnosis = doc.eval("[state['seen']['messages'], dock().connection.text()]")
    assert doc.eval("layers()") == before, diagnosis
    assert "Cancelled" in doc.eval("dock().message.text()"), diagnosis
    assert doc.eval("dock().generate.isEnabled()")
    after = generate(doc, "a quick one")
    diagnosis = doc.eval("[state['seen']['messages'], dock().connection.text()]")
    assert len(after) == len(before) + 1, diagnosis


def test_daemon_error_is_shown_in_plain_words(doc, daemon):
    before = new_document(doc, 64, 64)
    # Not a name from the list (the docker would say so itself): the daemon's refusal.
    doc.run("dock().model.info = None; dock().model.model_name = 'no-such-model'")
    try:
        after = generate(doc, "anything")
        assert after == before
        assert "does not have that model" in doc.eval("dock().message.text()")
    finally:
        doc.connect(daemon.address)  # the daemon's list and model again


def test_an_image_that_is_not_8_bit_rgb_is_explained(doc):
    doc.run(
        """
        d = app.createDocument(32, 32, "deep", "RGBA", "U16", "", 72.0)
        app.activeWindow().addView(d)
        state["doc"] = d
        record(dock().model)
        """
    )
    before = doc.eval("layers()")
    assert generate(doc, "anything") == before
    assert "8-bit RGB" in doc.eval("dock().message.text()")
    assert doc.eval("state['seen']['progress']") == [], "no job was sent"


def test_generate_without_an_image_asks_for_one(krita):
    krita.run("close_documents(); dock().prompt.setPlainText('x'); dock().generate.click()")
    assert krita.eval("dock().message.text()") == "Open or create an image first."
    assert krita.eval("dock().model.job is None and dock().generate.isEnabled()")


def test_daemon_stopping_mid_job_is_reported_krita_stays_responsive_and_it_reconnects(
    doc, daemon, daemon_factory
):
    own = daemon_factory(token="krita-secret-0123456789")
    before = new_document(doc, 64, 64)
    try:
        # This daemon requires a token: the docker says so, then takes the right one.
        doc.connect(own.address, expect="needs a token")
        doc.connect(own.address, token="wrong", expect="did not accept the token")
        doc.connect(own.address, token="krita-secret-0123456789")
        assert doc.eval("app.readSetting('sdbridge', 'address', '')") == own.address
        assert doc.eval("app.readSetting('sdbridge', 'token', '')") == "krita-secret-0123456789"
        doc.run("dock().prompt.setPlainText('a long one'); dock().steps.setValue(150)")
        doc.run("dock().images.setValue(3); dock().generate.click(); dock().images.setValue(1)")
        doc.wait_for("any(step >= 2 for step, total in state['seen']['progress'])", timeout=30)
        own.stop()
        doc.wait_for("dock().model.job is None", timeout=30)
        # A stopping daemon cancels its jobs (a killed one would just vanish): either way the
        # artist reads that the daemon ended it.
        assert re.search(
            "daemon stopped this job|connection to the sdbridge daemon was lost",
            doc.eval("dock().message.text()"),
        )
        doc.wait_for("'No sdbridge daemon' in dock().connection.text()", timeout=15)
        for _ in range(10):  # the GUI thread answers at once while the plugin retries
            start = time.monotonic()
            doc.eval("dock().connection.text()", timeout=5)
            assert time.monotonic() - start < 1.0
            time.sleep(0.2)
        doc.run("dock().prompt.setPlainText('nobody home'); dock().generate.click()")
        assert "sdbridge serve" in doc.eval("dock().message.text()")
        assert doc.eval("dock().model.job is None and layers()") == before
        own.start()  # same address: the plugin finds it again by itself
        doc.wait_for("'Connected' in dock().connection.text()", timeout=30)
        assert len(generate(doc, "back again")) == len(before) + 1
    finally:
        doc.connect(daemon.address)


def test_a_malformed_address_is_explained(krita, daemon):
    try:
        krita.connect("localhost:7878", expect="not a daemon address")
    finally:
        krita.connect(daemon.address)


def stroke(krita, index: int, bgra: tuple[int, int, int, int] = (0, 0, 255, 255)) -> None:
    """A square painted on the background, as a brush stroke lands on a layer."""
    krita.run(
        f"state['doc'].rootNode().childNodes()[0].setPixelData("
        f"bytes({list(bgra)}) * 256, {6 * index}, {6 * index}, 16, 16)\n"
        "state['doc'].refreshProjection()"
    )


def sent_fields(krita, index: int) -> dict:
    """The fields of the `index`th recorded job, its images' bytes as the daemon gets them."""
    fields = krita.eval(
        "{k: ({**v, 'data': v['data'].hex()} if k.endswith('_image') else "
        "[{**c, 'image': {**c['image'], 'data': c['image']['data'].hex()}} for c in v] "
        f"if k == 'control' else v) for k, v in state['sent'][{index}][0].items()}}"
    )
    images = [fields[name] for name in ("init_image", "mask_image") if name in fields]
    for image in images + [entry["image"] for entry in fields.get("control", [])]:
        image["data"] = bytes.fromhex(image["data"])
    return fields


def control_row(index: int) -> str:
    """The docker's row of the `index`th control layer."""
    return f"dock().findChild(QWidget, 'sdbridge_control_{index}')"


def node(name: str) -> str:
    return f"[n for n in state['doc'].rootNode().childNodes() if n.name() == {name!r}][0]"


def png_rgba(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGBA")


def test_control_layers_are_made_and_picked_in_the_docker_and_steer_no_picture(doc, daemon):
    """New control layer gives a layer to scribble on; Use layer makes the active one a control.
    Each row's kind and strength go with the job, the layers' pixels over the job's region, and
    the picture the job starts from is drawn without them. A hidden control layer is switched
    off; × forgets a row, never the layer."""
    width, height = 64, 48
    before = new_document(doc, width, height)
    doc.run("dock().findChild(QPushButton, 'sdbridge_new_control').click()")
    layers = doc.eval("layers()")
    assert layers == [*before, ["Control 1", "paintlayer", [0, 0, 0, 0]]]
    assert doc.eval("state['doc'].activeNode().name()") == "Control 1", "drawn on at once"
    # A white blob on the control layer; a grey square on a sketch layer of the artist's.
    doc.run(
        f"{node('Control 1')}.setPixelData(bytes([255, 255, 255, 255]) * 100, 8, 8, 10, 10)\n"
        "sketch = state['doc'].createNode('Sketch', 'paintlayer')\n"
        "state['doc'].rootNode().addChildNode(sketch, None)\n"
        "sketch.setPixelData(bytes([90, 90, 90, 255]) * 144, 40, 20, 12, 12)\n"
        "state['doc'].refreshProjection(); state['doc'].waitForDone(); settle()\n"
        "state['doc'].setActiveNode(sketch)"
    )
    doc.wait_for("state['doc'].activeNode().name() == 'Sketch'", timeout=10)
    doc.run("dock().findChild(QPushButton, 'sdbridge_use_layer').click()")
    assert doc.eval("len(dock().model.controls)") == 2
    doc.run(
        f"row = {control_row(1)}; row.kind.setCurrentIndex(row.kind.findData('canny'))\n"
        "row.strength.setValue(0.6)"
    )
    assert doc.eval(f"{control_row(0)}.findChild(QLabel).text()") == "Control 1"
    doc.run(RECORD_JOBS)
    try:
        generate(doc, "a house", strength=50)
        fields = sent_fields(doc, 0)
        message = doc.eval("dock().message.text()")
        doc.run(f"{node('Control 1')}.setVisible(False)")
        generate(doc, "a house", strength=50)
        hidden = sent_fields(doc, 1)
    finally:
        doc.run(f"dock().strength.setValue(100); {STOP_RECORDING}")
    first, second = fields["control"]
    assert {k: first[k] for k in ("preprocessor", "strength")} == {
        "preprocessor": "scribble",
        "strength": 1.0,
    }
    assert {k: second[k] for k in ("preprocessor", "strength")} == {
        "preprocessor": "canny",
        "strength": 0.6,
    }
    assert "model" not in first, "automatic: the daemon's ControlNet for the model"
    blob = np.asarray(png_rgba(first["image"]["data"]))
    assert blob.shape == (height, width, 4)
    assert (blob[..., 3] == 255).sum() == 100 and blob[8:18, 8:18, 3].min() == 255
    square = np.asarray(png_rgba(second["image"]["data"]))
    assert (square[..., 3] == 255).sum() == 144 and tuple(square[25, 45]) == (90, 90, 90, 255)
    # The picture the job starts from: the background, without either control layer.
    assert rgba_to_bgra(fields["init_image"]["data"]) == bytes(FILL) * width * height
    # This daemon has no ControlNet for its model: it says so, in words the artist can act on.
    assert "no listed ControlNet fits model" in message
    assert [entry["preprocessor"] for entry in hidden["control"]] == ["canny"]
    doc.run(f"{control_row(0)}.findChild(QPushButton, 'sdbridge_control_remove').click()")
    assert doc.eval("[c.choice.preprocessor for c in dock().model.controls]") == ["canny"]
    assert doc.eval(f"{control_row(0)}.findChild(QLabel).text()") == "Sketch"
    assert [layer[0] for layer in doc.eval("layers()")][-2:] == ["Control 1", "Sketch"]
    # The row follows a renamed layer; another image shows none of this image's rows, and
    # they come back with it.
    doc.run(f"{node('Sketch')}.setName('Line art')")
    label = f"{control_row(0)}.findChild(QLabel).text()"
    doc.wait_for(f"{control_row(0)} is not None and {label} == 'Line art'", timeout=10)
    doc.run("state['first'] = state['doc']")
    new_document(doc, 32, 32)
    doc.wait_for(f"dock().controls.isHidden() and {control_row(0)} is None", timeout=10)
    doc.run(
        "window = app.activeWindow()\n"
        "view = [v for v in window.views() if v.document() == state['first']][0]\n"
        "window.showView(view); view.setVisible()\n"
        "state['doc'] = state['first']; settle()"
    )
    doc.wait_for(f"not dock().controls.isHidden() and {label} == 'Line art'", timeout=10)
    doc.run(f"{control_row(0)}.findChild(QPushButton, 'sdbridge_control_remove').click()")
    assert doc.eval("[len(dock().model.controls), dock().controls.isVisible()]") == [0, False]


def rgba_to_bgra(data: bytes) -> bytes:
    out = bytearray(data)
    out[0::4], out[2::4] = data[2::4], data[0::4]
    return bytes(out)


def test_live_mode_paints_the_latest_stroke_only_and_apply_keeps_it(doc, daemon):
    """While Live is on, each stroke sends a live job of the canvas; a newer stroke supersedes
    the job of the one before, so only the latest stroke's image lands on the live layer, and
    every job still ends. The live layer is never part of a job's input."""
    side = 64
    before = new_document(doc, side, side)
    names = [layer[0] for layer in before]
    whole = [0, 0, side, side]
    doc.run(RECORD_JOBS)
    try:
        # Many steps: each stroke below comes while the job of the one before still runs.
        doc.run("dock().prompt.setPlainText('a red circle'); dock().steps.setValue(150)")
        doc.run("dock().strength.setValue(90); dock().live.click()")
        assert doc.eval("[dock().live.isChecked(), dock().generate.text()]") == [True, "Apply"]
        assert [layer[0] for layer in doc.eval("layers()")] == [*names, "sdbridge live"]
        doc.wait_for("len(state['sent']) == 1")  # the canvas as it is when Live goes on
        # The artist paints on where they were, not on the (locked) live layer.
        assert doc.eval("state['doc'].activeNode().name()") == "Background"
        for index in range(4):
            stroke(doc, index)
            doc.wait_for(f"len(state['sent']) == {index + 2}")
        doc.wait_for("all(g.view.done for f, g in state['sent'])", timeout=120)
        ended = doc.eval("[[g.view.phase.name, g.view.message] for f, g in state['sent']]")
        assert [phase for phase, _ in ended] == ["CANCELLED"] * 4 + ["FINISHED"], ended
        assert {message for _, message in ended[:4]} == {"A newer live job took this one's place."}
        doc.wait_for("state['seen']['previews'] == 1")  # the one image that landed
        live = pixels(doc, LIVE_LAYER, whole)
        canvas = pixels(doc, "state['doc'].rootNode().childNodes()[0]", whole)
        last = sent_fields(doc, 4)
        assert last["live"] is True and last["strength"] == 0.9
        assert rgba_to_bgra(last["init_image"]["data"]) == canvas, "the latest stroke's canvas"
        del last["live"]
        with Client(daemon.address, timeout=60) as client:
            again = client.generate(**last).result(timeout=60)["images"][0]
        assert live == rgba_to_bgra(again["data"]), "the daemon's image of that canvas"

        # The next stroke's job reads the artist's layers, not the live image over them.
        stroke(doc, 5, (0, 255, 0, 255))
        doc.wait_for("len(state['sent']) == 6")
        canvas = pixels(doc, "state['doc'].rootNode().childNodes()[0]", whole)
        sent = rgba_to_bgra(sent_fields(doc, 5)["init_image"]["data"])
        assert sent == canvas and sent != live
        doc.wait_for("state['seen']['previews'] == 2", timeout=60)
        live = pixels(doc, LIVE_LAYER, whole)

        # Apply keeps the live image as a layer of the artist's, under the live layer.
        doc.run("dock().generate.click()")
        layers = doc.eval("layers()")
        seed = last["seed"]
        assert layers[:-1] == [*before, [f"a red circle ({seed})", "paintlayer", whole]]
        assert layers[-1][0] == "sdbridge live"
        applied = pixels(doc, "state['doc'].rootNode().childNodes()[-2]", whole)
        assert applied == live

        doc.run("dock().live.click()")
        assert doc.eval("[dock().live.isChecked(), dock().generate.text()]") == [False, "Generate"]
        assert [layer[0] for layer in doc.eval("layers()")] == [*names, f"a red circle ({seed})"]
        doc.wait_for("all(g.view.done for f, g in state['sent'])", timeout=CANCEL_GRACE_S + 5)
    finally:
        doc.run(f"dock().live.setChecked(False); dock().strength.setValue(100); {STOP_RECORDING}")


def test_a_job_reads_the_artists_layers_not_the_history_preview_over_them(doc, daemon):
    new_document(doc, 64, 64)
    generate(doc, "two pears", images=2)  # the first image shows on the preview layer
    try:
        assert doc.eval("layers()")[-1][0] == "sdbridge preview"
        doc.run(RECORD_JOBS)
        generate(doc, "a pear", strength=40)
        sent = rgba_to_bgra(sent_fields(doc, 0)["init_image"]["data"])
    finally:
        doc.run(f"dock().images.setValue(1); dock().strength.setValue(100); {STOP_RECORDING}")
    assert sent == bytes(FILL) * 64 * 64


def test_the_image_of_a_job_cut_off_by_a_lost_connection_joins_the_history(doc, daemon):
    """The connection drops while the daemon runs the job: the job fails for the artist, the
    daemon finishes and saves it, and once the plugin is connected again it finds the image
    among the daemon's saved results and adds it to the history."""
    new_document(doc, 64, 64)
    with TcpProxy(daemon.address) as proxy:
        try:
            doc.connect(proxy.address)
            doc.run("dock().prompt.setPlainText('a lost lighthouse'); dock().steps.setValue(150)")
            doc.run("dock().generate.click()")
            doc.wait_for("any(step >= 2 for step, total in state['seen']['progress'])")
            proxy.cut()
            doc.wait_for("dock().model.job is None", timeout=30)
            assert "joins the history" in doc.eval("dock().message.text()")
            doc.wait_for("'finished after all' in dock().message.text()", timeout=120)
        finally:
            doc.connect(daemon.address)
    saved = newest_output(daemon)
    assert saved.text["parameters"].startswith("a lost lighthouse")
    assert doc.eval("dock().history.item(0).toolTip()") == saved.text["parameters"]
    doc.run("dock().history.setCurrentRow(0); dock().apply.click()")
    name, kind, bounds = doc.eval("layers()")[-1]
    assert name.startswith("a lost lighthouse (") and bounds == [0, 0, 64, 64]
    layer = pixels(doc, "state['doc'].rootNode().childNodes()[-1]", [0, 0, 64, 64])
    assert layer == as_bgra(saved, (0, 0, 64, 64)), "the pixels the daemon saved"


def made_by(address: str, key: str, prompt: str, **fields: object) -> Result:
    """A job of a session with this key, to its end: what another editor made."""
    with Session(address, session_key=key) as session:
        job = {"prompt": prompt, "width": 64, "height": 64, "num_inference_steps": 3, **fields}
        result = next(view for view in session.submit(job).views(timeout=60) if view.done).result
    assert result is not None
    return result


def history_tips(krita) -> list[str]:
    return krita.eval("[dock().history.item(i).toolTip() for i in range(dock().history.count())]")


def test_an_earlier_kritas_images_come_back_into_the_history_once(
    doc, daemon, daemon_factory, krita_profile
):
    """Krita (and the daemon) restarted since: the first time the docker connects to the daemon
    it brings the artist's newest results there back into the history, after this session's
    images, with nothing added to the canvas; Apply places one at the top left, exactly as
    saved. Another user's results on the same tokenless daemon stay out, and an image already
    in the history does not join it twice."""
    own = daemon_factory()
    # The key this Krita reads (its XDG_CONFIG_HOME is the profile's): an earlier Krita's too.
    key = session_key(krita_profile / "config" / "sdbridge" / SESSION_KEY_FILE)
    earlier = made_by(own.address, key, "an earlier lighthouse", num_images=2, seed=5)
    theirs = made_by(own.address, new_session_key(), "someone else's cat")
    own.restart()  # the daemon lists them from its index
    before = new_document(doc, 64, 64)
    held = history_tips(doc)
    doc.run(
        "state['restored'] = []\n"
        "state['spy'] = lambda address, found: state['restored'].append([address, len(found)])\n"
        "dock().model._connection.restored.connect(state['spy'])"
    )
    try:
        doc.connect(own.address)
        doc.wait_for("'back in the history' in dock().message.text()", timeout=30)
        assert doc.eval("dock().message.text()").startswith(
            f"2 of your earlier images from {own.address} are back in the history"
        )
        newest_first = [image.parameters for image in reversed(earlier.images)]
        assert history_tips(doc) == [*held, *newest_first]
        assert theirs.images[0].parameters not in history_tips(doc)
        assert doc.eval("layers()") == before, "nothing is applied by itself"

        doc.run(f"dock().history.setCurrentRow({len(held)}); dock().apply.click()")
        name, kind, bounds = doc.eval("layers()")[-1]
        assert (name, kind, bounds) == ("an earlier lighthouse (6)", "paintlayer", [0, 0, 64, 64])
        saved = Image.open(earlier.images[1].path)
        layer = pixels(doc, "state['doc'].rootNode().childNodes()[-1]", [0, 0, 64, 64])
        assert layer == as_bgra(saved, (0, 0, 64, 64)), "the pixels the daemon saved"
        doc.run("dock().use_settings.click()")
        assert doc.eval("[dock().prompt.toPlainText(), dock().steps.value()]") == [
            "an earlier lighthouse", 3,
        ]  # fmt: skip

        # This session's images come before the earlier ones; the same daemon reached at
        # another address lists all three as the artist's, and none joins twice.
        generate(doc, "a new lighthouse", steps=3)
        tips = history_tips(doc)
        assert tips[0].startswith("a new lighthouse") and tips[-2:] == newest_first
        with TcpProxy(own.address) as proxy:
            doc.connect(proxy.address)
            doc.wait_for(f"{[proxy.address, 3]} in state['restored']", timeout=30)
        assert history_tips(doc) == tips

        # An earlier image goes on whichever image is active: not on one of other pixels.
        doc.run(
            'state["doc"] = app.createDocument(64, 64, "deep", "RGBA", "U16", "", 72.0)\n'
            'app.activeWindow().addView(state["doc"])'
        )
        deep = doc.eval("layers()")
        doc.run(f"dock().history.setCurrentRow({len(tips) - 1}); dock().apply.click()")
        assert "8-bit RGB" in doc.eval("dock().message.text()") and doc.eval("layers()") == deep
    finally:
        doc.run(
            "dock().model._connection.restored.disconnect(state['spy'])\n"
            "dock().fixed_seed.setChecked(False); dock().scheduler.setCurrentIndex(0)\n"
            "dock().guidance.setValue(dock().guidance.minimum())"
        )
        doc.connect(daemon.address)


def test_screenshot_of_the_docker_with_a_generated_layer(doc, daemon, tmp_path):
    """SDBRIDGE_UPDATE_SCREENSHOT=1 writes docs/images/krita.png; SDBRIDGE_SCREENSHOT_DAEMON
    names a daemon with a real model to paint it (the suite's pipeline paints noise)."""
    address = os.environ.get("SDBRIDGE_SCREENSHOT_DAEMON")
    new_document(doc, 512, 384)
    if address:
        doc.connect(address)
    try:
        generate(doc, "a large yellow star in the center on a blue background", steps=20)
        assert doc.eval("'Added' in dock().message.text()")
        shot = _screenshot(doc, tmp_path / "krita.png")
        # The history after a job of three images: the docker alone, scrolled to it.
        generate(doc, "a red circle on a green background", steps=20, images=3)
        doc.run("dock().images.setValue(1)")
        history = tmp_path / "krita-history.png"
        doc.run(
            "dock().widget().findChild(QScrollArea).ensureWidgetVisible(dock().history)\n"
            f"dock().grab().save({str(history)!r})"
        )
    finally:
        if address:
            doc.connect(daemon.address)
    assert shot.stat().st_size > 10_000 and history.stat().st_size > 5_000
    if os.environ.get("SDBRIDGE_UPDATE_SCREENSHOT"):
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(shot, SCREENSHOT)
        shutil.copy2(history, SCREENSHOT.with_name("krita-history.png"))


def test_screenshot_of_live_mode(doc, daemon, tmp_path):
    """SDBRIDGE_UPDATE_SCREENSHOT=1 writes docs/images/krita-live.png: a rough yellow disk
    painted on a blue canvas, and over it on the live layer what the model makes of it."""
    address = os.environ.get("SDBRIDGE_SCREENSHOT_DAEMON")
    doc.run("new_document(512, 384, [170, 70, 20, 255]); record(dock().model)")
    doc.run(
        """
        background, yellow = state['doc'].rootNode().childNodes()[0], bytes([20, 210, 250, 255])
        for y in range(192 - 110, 192 + 110):
            half = int((110 ** 2 - (y - 192) ** 2) ** 0.5)
            background.setPixelData(yellow * 2 * half, 256 - half, y, 2 * half, 1)
        state['doc'].refreshProjection()
        """
    )
    if address:
        doc.connect(address)
    try:
        prompt = "a large yellow circle in the center on a blue background"
        doc.run(f"dock().prompt.setPlainText({prompt!r}); dock().strength.setValue(60)")
        doc.run("dock().fixed_seed.setChecked(True); dock().seed.setText('5')")
        doc.run("dock().live.click()")
        doc.wait_for("state['seen']['previews'] >= 1", timeout=60)
        shot = _screenshot(doc, tmp_path / "krita-live.png")
    finally:
        doc.run("dock().live.setChecked(False); dock().strength.setValue(100)")
        doc.run("dock().fixed_seed.setChecked(False)")
        if address:
            doc.connect(daemon.address)
    assert shot.stat().st_size > 10_000
    if os.environ.get("SDBRIDGE_UPDATE_SCREENSHOT"):
        shutil.copy2(shot, SCREENSHOT.with_name("krita-live.png"))


def _screenshot(krita, path: Path) -> Path:
    # Room for the docker: only the layers and sdbridge dockers stay, in a larger window.
    krita.run(
        """
        from PyQt5.QtCore import Qt
        from PyQt5.QtWidgets import QDockWidget
        window = app.activeWindow().qwindow()
        for d in window.findChildren(QDockWidget):
            if d.objectName() not in ("sdbridge_docker", "KisLayerBox"):
                d.hide()
        window.resize(1400, 960)
        layers = window.findChild(QDockWidget, "KisLayerBox")
        window.resizeDocks([layers, dock()], [150, 800], Qt.Vertical)
        """
    )
    time.sleep(1)  # let Krita lay the window out again before grabbing it
    assert krita.eval(f"app.activeWindow().qwindow().grab().save({str(path)!r})")
    return path


def _inside(rect: list[int], x: int, y: int) -> bool:
    return rect[0] <= x < rect[0] + rect[2] and rect[1] <= y < rect[1] + rect[3]


def _daemon_hello(daemon) -> dict:
    with Client(daemon.address, timeout=10) as client:
        client.wait_connected(10)
        return client.hello()


def test_a_scribble_on_a_control_layer_puts_the_embedded_models_object_there(
    doc, daemon, daemon_factory, tmp_path
):
    """The embedded model and its ControlNet, as a new user has them: a blob scribbled on a new
    control layer at the top right of a 512x384 canvas is where the red circle is painted; with
    the layer hidden (switched off) the same seed paints it elsewhere.
    SDBRIDGE_UPDATE_SCREENSHOT=1 writes docs/images/krita-control.png of the steered one."""
    tiny_daemon = daemon_factory(model=tiny.MODEL_DIR)
    width, height, box = 512, 384, (300, 50, 440, 190)
    region = ellipse(width, height, box)
    left, top, right, bottom = box
    blob = np.zeros((bottom - top, right - left, 4), np.uint8)
    blob[region[top:bottom, left:right]] = 255  # white, opaque: BGRA as RGBA
    new_document(doc, width, height)
    overlaps, parameters = {}, {}
    try:
        doc.connect(tiny_daemon.address)
        doc.run("dock().fixed_seed.setChecked(True); dock().seed.setText('11')")
        doc.run("dock().findChild(QPushButton, 'sdbridge_new_control').click()")
        doc.run(
            f"{node('Control 1')}.setPixelData(bytes.fromhex({blob.tobytes().hex()!r}), "
            f"{left}, {top}, {right - left}, {bottom - top})"
        )
        for label, shown in (("steered", True), ("plain", False)):
            doc.run(f"{node('Control 1')}.setVisible({shown})")
            generate(doc, "a red circle on a blue background", steps=None)
            bgra = pixels(doc, "state['doc'].rootNode().childNodes()[-1]", [0, 0, width, height])
            picture = np.frombuffer(bgra, np.uint8).reshape(height, width, 4)[..., [2, 1, 0, 3]]
            overlaps[label] = scribble_overlap(picture, region, (144, 112))
            parameters[label] = newest_output(tiny_daemon).text["parameters"]
            if label == "steered":
                shot = _screenshot(doc, tmp_path / "krita-control.png")
    finally:
        doc.run(
            "dock().fixed_seed.setChecked(False); dock().model.controls.clear(); "
            "dock().model.controls_changed.emit()"
        )
        doc.connect(daemon.address)
    print(f"Krita scribble overlap: {overlaps}")
    assert "Module: scribble, Model: sdbridge-tiny-scribble, Weight: 1" in parameters["steered"]
    assert "ControlNet" not in parameters["plain"]
    assert overlaps["steered"] >= 0.5 and overlaps["plain"] <= overlaps["steered"] - 0.25
    if os.environ.get("SDBRIDGE_UPDATE_SCREENSHOT"):
        shutil.copy2(shot, SCREENSHOT.with_name("krita-control.png"))
