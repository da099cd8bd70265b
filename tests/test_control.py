"""Control layers: ControlNets from the controlnets folder steer a job through a real daemon, in
every mode; what does not fit the model or the protocol is refused with a clear error."""

from __future__ import annotations

import dataclasses
import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from helpers import (
    DaemonProcess,
    Peer,
    pixels,
    raw_image,
    result_image,
    sdbridge,
    solid_image,
    wait_until,
)
from PIL import Image
from pipelines import NATIVE_SIZE, build_controlnet
from safetensors.torch import save_file

from sdbridge import tiny
from sdbridge.daemon.controlnets import ControlNetCache, ControlNetRegistry
from sdbridge.daemon.preprocessors import PREPROCESSORS
from sdbridge.editor.canvas import Bounds, Extent, copy_region, plan_job
from sdbridge.editor.control import ControlChoice, check_controls, control_entries, parse_control
from sdbridge.editor.history import saved_settings
from sdbridge.editor.results import SavedResult
from sdbridge.editor.session import Session, Settings, editor_fields
from sdbridge.wire import protocol
from sdbridge.wire.protocol import Limits, ProtocolError, validate_generate

SIZE = NATIVE_SIZE
JOB = {"prompt": "a red circle", "num_inference_steps": 4, "seed": 7, "model": "tiny-sd"}


def square(left: int, top: int, side: int = 24) -> dict:
    """A control layer as an editor sends it: white strokes on a transparent layer."""
    layer = np.zeros((SIZE, SIZE, 4), np.uint8)
    layer[top : top + side, left : left + side] = 255
    return raw_image(layer)


LEFT, RIGHT = square(4, 20), square(36, 20)


def control(model: str = "edges", image: dict = LEFT, **fields: object) -> dict:
    return {"image": image, "model": model, **fields}


@pytest.fixture(scope="module")
def controlnets(pipeline_dir: Path, library: Path, tmp_path_factory) -> Path:
    """A controlnets folder as users fill it: diffusers folders, one in a subfolder, the same
    weights as one diffusers-format file, an SDXL ControlNet, and files that are none."""
    root = tmp_path_factory.mktemp("controlnets")
    unet = StableDiffusionPipeline.from_pretrained(pipeline_dir).unet
    edges = build_controlnet(unet, root / "edges", seed=1)
    save_file(edges.state_dict(), root / "edges-file.safetensors")
    build_controlnet(unet, root / "styles" / "blobs", seed=2)
    xl_unet = StableDiffusionXLPipeline.from_pretrained(library / "models" / "xl" / "tiny-xl").unet
    xl_edges = build_controlnet(xl_unet, root / "xl-edges", seed=3)
    save_file(xl_edges.state_dict(), root / "xl-edges-file.safetensors")
    (root / "notes.txt").write_text("not a ControlNet")
    (root / "broken.safetensors").write_bytes(b"not a safetensors file")
    save_file({"weight": torch.zeros(2)}, root / "other.safetensors")
    return root


@pytest.fixture(scope="module")
def control_daemon(
    pipeline_dir: Path, library: Path, controlnets: Path, tmp_path_factory
) -> DaemonProcess:
    workdir = tmp_path_factory.mktemp("control-daemon")
    folders = ("--controlnets-dir", str(controlnets), "--models-dir", str(library / "models"))
    process = DaemonProcess(pipeline_dir, workdir, *folders).start()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def peer(control_daemon: DaemonProcess) -> Peer:
    connection = Peer(control_daemon.address)
    yield connection
    connection.close()


@pytest.fixture(scope="module")
def base(peer: Peer) -> np.ndarray:
    return result_image(peer.generate(**JOB))


def image(peer: Peer, *controls: dict, **fields: object) -> np.ndarray:
    return result_image(peer.generate(**{**JOB, **fields}, control=list(controls)))


def test_hello_and_models_list_the_controlnets_with_their_family(peer: Peer) -> None:
    hello = peer.answer("hello")
    assert "control" in hello["capabilities"]
    assert hello["preprocessors"] == ["none", "scribble", "canny"]
    # The embedded model's own comes first, where the package has its weights.
    embedded = [tiny.CONTROLNET_NAME] if tiny.controlnet_is_present() else []
    assert hello["controlnets"][: len(embedded)] == embedded
    assert sorted(hello["controlnets"][len(embedded) :]) == [
        "edges",
        "edges-file",
        "styles/blobs",
        "xl-edges",
        "xl-edges-file",
    ]
    listed = {e["name"]: e for e in peer.answer("models")["controlnets"]}
    assert {name: e["family"] for name, e in listed.items()} == {
        **{name: "sd1" for name in embedded},
        "edges": "sd1",
        "edges-file": "sd1",
        "styles/blobs": "sd1",
        "xl-edges": "sdxl",
        "xl-edges-file": "sdxl",
    }
    assert all(e["size_bytes"] > 0 for e in listed.values())


def test_a_controlnet_steers_the_image_and_strength_zero_leaves_it_alone(
    peer: Peer, base: np.ndarray
) -> None:
    steered = image(peer, control())
    assert np.abs(steered - base).mean() > 2.0
    assert np.array_equal(image(peer, control()), steered)  # the same job again
    # Strength 0 adds zeros to the UNet's features: the plain image, though through the
    # ControlNet pipeline (another code path: a stated tolerance of one level).
    assert np.abs(image(peer, control(strength=0.0)) - base).max() <= 1


def test_where_the_control_layer_is_drawn_decides(peer: Peer) -> None:
    # An untrained ControlNet: the image changes the result, though not yet where it is drawn
    # (the embedded model's own ControlNet does that). A mean of 1.6 levels here; noise from
    # another CPU is far below 0.5.
    assert np.abs(image(peer, control(image=RIGHT)) - image(peer, control())).mean() > 0.5


def test_start_and_end_limit_the_steps_it_steers(peer: Peer, base: np.ndarray) -> None:
    whole = image(peer, control())
    early = image(peer, control(end=0.5))
    # Means of about 0.5 levels each here; noise from another CPU is far below 0.2.
    assert np.abs(early - whole).mean() > 0.2 and np.abs(early - base).mean() > 0.2


def test_a_single_file_loads_as_its_diffusers_folder(peer: Peer) -> None:
    assert np.array_equal(image(peer, control("edges-file")), image(peer, control()))


def test_two_controlnets_at_once_each_count(peer: Peer) -> None:
    edges = image(peer, control())
    blobs = image(peer, control("styles/blobs", RIGHT))
    both = image(peer, control(), control("styles/blobs", RIGHT))
    assert min(np.abs(both - edges).mean(), np.abs(both - blobs).mean()) > 1.0


def test_control_works_with_img2img_and_inpainting(peer: Peer) -> None:
    start = solid_image(SIZE, SIZE, (40, 90, 200, 255))
    plain = result_image(peer.generate(**JOB, init_image=start, strength=0.8))
    steered = image(peer, control(), init_image=start, strength=0.8)
    assert steered.shape == (SIZE, SIZE, 4) and np.abs(steered - plain).mean() > 1.0
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[:, SIZE // 2 :] = 255
    painted = image(peer, control(image=RIGHT), init_image=start, mask_image=raw_image(mask))
    # Outside the mask the init image stays exactly as it was.
    assert np.array_equal(painted[:, : SIZE // 4], pixels(start)[:, : SIZE // 4])


def test_the_parameters_record_each_controlnet_as_a1111_does(peer: Peer) -> None:
    events = peer.generate(**JOB, control=[control(preprocessor="scribble", strength=0.8, end=0.5)])
    text = events[-1]["parameters"]
    assert text.endswith(
        'ControlNet 0: "Module: scribble, Model: edges, Weight: 0.8, '
        'Guidance Start: 0, Guidance End: 0.5"'
    )
    # "Use settings" still reads the job's own model and numbers, not the ControlNet's.
    entry = {"number": 1, "job": "j", "seed": 7, "width": SIZE, "height": SIZE, "thumbnail": {}}
    saved = SavedResult.from_dict(
        {**entry, "prompt": JOB["prompt"], "model": "tiny-sd", "parameters": text}
    )
    settings = saved_settings(saved)
    assert (settings.num_inference_steps, settings.model) == (4, "tiny-sd")


def test_an_sdxl_controlnet_on_an_sd1_model_is_refused_and_the_daemon_serves_on(
    peer: Peer, base: np.ndarray
) -> None:
    error = peer.generate(**JOB, control=[control("xl-edges")])[-1]
    assert (error["event"], error["code"], error["field"]) == (
        "error",
        "controlnet_load_failed",
        "control",
    )
    assert "sdxl" in error["message"] and "sd1" in error["message"]
    assert np.array_equal(result_image(peer.generate(**JOB)), base)


def test_an_sdxl_model_takes_sdxl_controlnets_from_a_folder_or_a_file(peer: Peer) -> None:
    xl = {**JOB, "model": "xl/tiny-xl"}
    plain = result_image(peer.generate(**xl))
    steered = result_image(peer.generate(**xl, control=[control("xl-edges")]))
    assert np.abs(steered - plain).mean() > 0.5
    from_file = result_image(peer.generate(**xl, control=[control("xl-edges-file")]))
    assert np.array_equal(from_file, steered)
    error = peer.generate(**xl, control=[control("edges")])[-1]
    assert (error["code"], error["field"]) == ("controlnet_load_failed", "control")


def test_an_unknown_controlnet_is_refused_before_the_job_queues(peer: Peer) -> None:
    for name in ("nothing-here", "notes", "broken", "other", "../edges"):
        error = peer.generate(**JOB, control=[control(name)])[-1]
        assert (error["code"], error["field"]) == ("unknown_controlnet", "control"), name


def test_a_controlnet_put_in_the_folder_while_the_daemon_runs_is_found(
    peer: Peer, pipeline_dir: Path, controlnets: Path
) -> None:
    unet = StableDiffusionPipeline.from_pretrained(pipeline_dir).unet
    build_controlnet(unet, controlnets / "new", seed=4)
    try:
        # The `models` op rescans the folders (at most once a second).
        wait_until(lambda: "new" in {e["name"] for e in peer.answer("models")["controlnets"]})
        answer = peer.generate(**JOB, control=[control("new")])[-1]
        assert answer["event"] == "result", answer
    finally:
        shutil.rmtree(controlnets / "new")


BAD_CONTROL = [
    ({"control": {}}, "bad_type"),
    ({"control": [control()] * 5}, "out_of_range"),
    ({"control": ["edges"]}, "bad_type"),
    ({"control": [control(weight=1.0)]}, "unknown_field"),
    ({"control": [{"model": "edges"}]}, "missing_field"),
    ({"control": [{"model": None, "preprocessor": "none"}]}, "missing_field"),
    ({"control": [control(model=3)]}, "bad_type"),
    ({"control": [control(strength="1")]}, "bad_type"),
    ({"control": [control(strength=True)]}, "bad_type"),
    ({"control": [control(model="")]}, "out_of_range"),
    ({"control": [control(preprocessor="depth")]}, "out_of_range"),
    ({"control": [control(strength=2.5)]}, "out_of_range"),
    ({"control": [control(strength=float("nan"))]}, "out_of_range"),
    ({"control": [control(start=0.6, end=0.4)]}, "out_of_range"),
    ({"control": [control(end=1.5)]}, "out_of_range"),
    ({"control": [control(image={"width": 2, "height": 2, "data": b"x"})]}, "bad_image"),
]


def test_a_control_png_that_does_not_decode_is_refused_before_accepted(peer: Peer) -> None:
    png = protocol.encode_png(SIZE, SIZE, pixels(LEFT).tobytes())
    broken = {"width": SIZE, "height": SIZE, "format": "png", "data": png[:-40]}
    events = peer.generate(**JOB, control=[control(image=broken)])
    assert [(e["event"], e.get("code"), e.get("field")) for e in events] == [
        ("error", "bad_image", "control")
    ]


@pytest.mark.parametrize(("fields", "code"), BAD_CONTROL)
def test_malformed_control_entries_are_refused_naming_the_field(fields: dict, code: str) -> None:
    with pytest.raises(ProtocolError) as raised:
        validate_generate({"prompt": "x", **fields}, Limits())
    assert (raised.value.code, raised.value.field) == (code, "control")


def test_a_valid_control_entry_gets_its_defaults() -> None:
    request = validate_generate({"prompt": "x", "control": [control()]}, Limits())
    (entry,) = request.control
    assert (entry.model, entry.preprocessor, entry.strength, entry.start, entry.end) == (
        "edges",
        "none",
        1.0,
        0.0,
        1.0,
    )
    # Without a model (or nil), the daemon picks the first listed ControlNet that fits.
    for entry in ({"image": LEFT}, {"image": LEFT, "model": None}):
        assert (
            validate_generate({"prompt": "x", "control": [entry]}, Limits()).control[0].model
            is None
        )


def test_the_daemon_has_a_preprocessor_for_every_name_the_protocol_lists() -> None:
    assert list(PREPROCESSORS) == list(protocol.PREPROCESSORS)


def test_scribble_finds_the_strokes_on_a_transparent_layer_and_on_paper() -> None:
    strokes = np.zeros((32, 32), bool)
    strokes[8:10, 4:28] = strokes[4:28, 20:23] = True
    layer = np.zeros((32, 32, 4), np.uint8)
    layer[strokes] = (30, 30, 30, 255)
    paper = np.full((32, 32, 3), 250, np.uint8)
    paper[strokes] = (20, 20, 20)
    for drawn in (Image.fromarray(layer, "RGBA"), Image.fromarray(paper).convert("RGBA")):
        marks = np.asarray(PREPROCESSORS["scribble"](drawn))
        assert np.array_equal(marks[..., 0] == 255, strokes)
        assert set(np.unique(marks)) == {0, 255}


def test_canny_marks_the_edges_of_a_shape_and_nothing_inside_it() -> None:
    painted = np.full((64, 64, 3), 255, np.uint8)
    painted[16:48, 16:48] = (200, 0, 0)
    edges = np.asarray(PREPROCESSORS["canny"](Image.fromarray(painted).convert("RGBA")))[..., 0]
    assert edges[16:48, 14:19].any() and edges[16:48, 45:50].any()
    assert not edges[20:44, 20:44].any() and not edges[:10].any()


def test_a_loaded_controlnet_is_kept_until_its_file_changes(
    pipeline_dir: Path, controlnets: Path, tmp_path: Path
) -> None:
    unet = StableDiffusionPipeline.from_pretrained(pipeline_dir).unet
    folder = tmp_path / "nets"
    folder.mkdir()
    (folder / "edges.safetensors").write_bytes(
        (controlnets / "edges-file.safetensors").read_bytes()
    )
    registry = ControlNetRegistry(folder)
    cache = ControlNetCache(torch.device("cpu"), torch.float32)
    entry = registry.get("edges")
    first = cache.get(entry, unet, "tiny-sd")
    assert cache.get(entry, unet, "tiny-sd") is first
    path = folder / "edges.safetensors"
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    assert cache.get(entry, unet, "tiny-sd") is not first


def test_the_cli_sends_control_layers_as_the_protocol_does(
    control_daemon: DaemonProcess, peer: Peer, tmp_path: Path
) -> None:
    layer = tmp_path / "scribble.png"
    Image.fromarray(pixels(LEFT)).save(layer)
    out = tmp_path / "out.png"
    job = ("generate", JOB["prompt"], "--model", "tiny-sd", "--steps", "4", "--seed", "7")
    done = sdbridge(
        *job, "--address", control_daemon.address, "-o", str(out), "--control", f"edges,{layer}"
    )
    assert done.returncode == 0, done.stderr
    drawn = np.asarray(Image.open(out).convert("RGBA"), np.int32)
    assert np.array_equal(drawn, image(peer, control()))
    # `auto` leaves the choice to the daemon, whose first fitting ControlNet here is edges.
    auto = tmp_path / "auto.png"
    done = sdbridge(
        *job, "--address", control_daemon.address, "-o", str(auto), "--control", f"auto,{layer}"
    )
    assert done.returncode == 0, done.stderr
    assert np.array_equal(np.asarray(Image.open(auto).convert("RGBA"), np.int32), drawn)
    bad = sdbridge(*job, "--address", control_daemon.address, "--control", f"edges,{layer},depth")
    assert bad.returncode == 2 and "scribble" in bad.stderr


def test_a_control_spec_reads_as_the_cli_documents_it() -> None:
    assert parse_control("edges, a.png") == (ControlChoice("edges"), "a.png")
    assert parse_control("styles/blobs,b.png,scribble,0.6,0.1,0.7") == (
        ControlChoice("styles/blobs", "scribble", 0.6, 0.1, 0.7),
        "b.png",
    )
    assert parse_control("auto,c.png,scribble") == (ControlChoice("", "scribble"), "c.png")
    for spec in ("edges", "edges,a.png,canny,x", "edges,a.png,none,1,0.5", ",a.png"):
        with pytest.raises(ValueError, match="--control"):
            parse_control(spec)
    assert ControlChoice("edges", strength=0.5).entry(LEFT) == control(
        preprocessor="none", strength=0.5, start=0.0, end=1.0
    )


def test_an_entry_without_a_model_gets_the_first_listed_controlnet_that_fits(
    peer: Peer, daemon: DaemonProcess
) -> None:
    events = peer.generate(**JOB, control=[{"image": LEFT}])
    assert "Model: edges, Weight: 1," in events[-1]["parameters"]
    assert np.array_equal(result_image(events), image(peer, control()))
    xl = peer.generate(**{**JOB, "model": "xl/tiny-xl"}, control=[{"image": LEFT}])
    assert "Model: xl-edges, Weight: 1," in xl[-1]["parameters"]
    # A daemon whose ControlNets (at most the embedded model's) fit another model says so.
    other = Peer(daemon.address)
    try:
        error = other.generate(**JOB, control=[{"image": LEFT}])[-1]
    finally:
        other.close()
    assert (error["code"], error["field"]) == ("unknown_controlnet", "control")
    assert "no listed ControlNet fits model 'tiny-sd' (sd1, context width 32)" in error["message"]


def test_an_editor_sends_its_control_layer_cut_to_the_jobs_region(
    control_daemon: DaemonProcess,
) -> None:
    """A selection's job (Repaint) covers the selection and some context: the control layer is
    cut to that region, as the canvas is, and travels as PNG."""
    extent = Extent(96, 80)
    layer = np.zeros((extent.height, extent.width, 4), np.uint8)
    layer[30:50, 20:44] = (255, 255, 255, 255)  # a blob on a transparent layer
    plan = plan_job(extent, Bounds(24, 24, 40, 32))
    rgba = copy_region(layer.tobytes(), Bounds.of(extent), plan.bounds, 4)
    choice = ControlChoice(preprocessor="scribble", strength=0.7)
    (entry,) = control_entries([(choice, rgba)], plan)
    assert "model" not in entry  # the daemon picks the ControlNet that fits
    assert entry["image"]["format"] == "png"
    cut = layer[plan.bounds.y : plan.bounds.bottom, plan.bounds.x : plan.bounds.right]
    sent = Image.open(io.BytesIO(entry["image"]["data"]))
    assert sent.size == (plan.bounds.width, plan.bounds.height)
    assert np.array_equal(np.asarray(sent.convert("RGBA")), cut)
    settings = Settings("a red circle", model="tiny-sd", num_inference_steps=2, seed=1)
    canvas = bytes([40, 90, 200, 255]) * plan.bounds.extent.pixel_count  # what is there
    with Session(control_daemon.address) as session:
        fields = editor_fields(settings, plan, canvas, control=[entry])
        done = list(session.submit(fields).views(timeout=120))[-1]
    assert done.result is not None, done.message
    assert done.result.images[0].parameters.endswith(
        'ControlNet 0: "Module: scribble, Model: edges, Weight: 0.7, '
        'Guidance Start: 0, Guidance End: 1"'
    )


def test_an_editor_explains_control_layers_the_daemon_would_refuse(
    control_daemon: DaemonProcess,
) -> None:
    with Session(control_daemon.address) as session:
        info = session.info()
    assert "edges" in info.controlnets and info.preprocessors == ("none", "scribble", "canny")
    fine = [ControlChoice(), ControlChoice("styles/blobs", "canny", 0.5)]
    assert check_controls(fine, info) is None
    assert check_controls([], dataclasses.replace(info, capabilities=frozenset())) is None
    problems = {
        "update sdbridge": check_controls(
            fine, dataclasses.replace(info, capabilities=frozenset({"txt2img"}))
        ),
        "At most 4": check_controls([ControlChoice()] * 5, info),
        "no ControlNet “depth”": check_controls([ControlChoice("depth")], info),
        "No control kind “pose”": check_controls([ControlChoice(preprocessor="pose")], info),
    }
    for expected, problem in problems.items():
        assert problem is not None and expected in problem, (expected, problem)
