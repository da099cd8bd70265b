"""A models folder as artists fill it: listed with families and sizes, chosen per job, switched
at run time while queued jobs wait, kept resident up to a count, broken files refused per job."""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from checkpoints import assert_same_picture, assert_same_weights
from diffusers import StableDiffusionPipeline
from helpers import Peer, result_image, sdbridge, wait_until
from PIL import Image
from safetensors.torch import save_file

from sdbridge import tiny
from sdbridge.cli import main
from sdbridge.daemon import models
from sdbridge.daemon.cache import ModelCache
from sdbridge.daemon.engine import Engine
from sdbridge.daemon.loras import LoraRegistry
from sdbridge.daemon.models import ModelEntry, ModelRegistry, describe, load_pipeline, scan
from sdbridge.wire.protocol import GenerateRequest, LoraWeight, ProtocolError

JOB = {"prompt": "a red circle on a blue background", "num_inference_steps": 4, "seed": 42}


def listing(library_peer: Peer) -> dict[str, dict]:
    event = library_peer.answer("models")
    assert event["event"] == "models", event
    return {entry["name"]: entry for entry in event["models"]}


# --- families and the folder scan, without a daemon --------------------------------------------


def test_the_scan_finds_folders_and_checkpoints_with_families_and_sizes(library: Path) -> None:
    entries = {entry.name: entry for entry in scan(library / "models")}
    assert set(entries) == {"xl/tiny-xl", "xl/tiny-xl-file", "tiny-sd-file", "tiny-sd-turbo"}
    assert entries["xl/tiny-xl"].family == entries["xl/tiny-xl-file"].family == "sdxl"
    assert entries["tiny-sd-file"].family == "sd1"
    assert entries["tiny-sd-turbo"].family == "sd1"
    checkpoint = library / "models" / "tiny-sd-file.safetensors"
    assert entries["tiny-sd-file"].size_bytes == checkpoint.stat().st_size
    folder = library / "models" / "xl" / "tiny-xl"
    on_disk = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert entries["xl/tiny-xl"].size_bytes == on_disk > 0


def test_pickle_checkpoints_are_listed_only_when_the_operator_allows_them(
    library: Path, tmp_path: Path
) -> None:
    assert not any(entry.name == "old" for entry in scan(library / "models"))
    # The stand-in pickle holds no model, so with permission it is read and then refused as such.
    folder = tmp_path / "models"
    folder.mkdir()
    state = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3)}
    torch.save(state, folder / "sd.ckpt")
    assert scan(folder) == []
    [entry] = scan(folder, allow_pickle=True)
    assert (entry.name, entry.family) == ("sd", "sd1")


@pytest.fixture(scope="module")
def pickled(pipeline_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test model as a diffusers folder of `.bin` weights (`safe_serialization=False`)."""
    folder = tmp_path_factory.mktemp("pickled") / "models" / "old-sd"
    pipe = StableDiffusionPipeline.from_pretrained(pipeline_dir)
    pipe.save_pretrained(folder, safe_serialization=False)
    # transformers writes the text encoder as safetensors whatever it is asked.
    assert models.pickle_components(folder) == ["unet", "vae"]
    return folder


def test_a_folder_of_pickle_weights_is_listed_only_when_the_operator_allows_it(
    pickled: Path,
) -> None:
    assert scan(pickled.parent) == []
    assert [entry.name for entry in scan(pickled.parent, allow_pickle=True)] == ["old-sd"]
    with pytest.raises(models.ModelRefused, match="unet.*--allow-pickle"):
        describe(str(pickled), "old-sd")


def test_a_folder_of_pickle_weights_loads_only_when_the_operator_allows_it(
    pickled: Path,
) -> None:
    """Checked again at load: a listed folder's weights may be swapped for pickles later."""
    entry = describe(str(pickled), "old-sd", allow_pickle=True)
    with pytest.raises(models.ModelRefused, match="--allow-pickle"):
        load_pipeline(entry, torch.float32)
    assert load_pipeline(entry, torch.float32, allow_pickle=True).unet is not None


def test_serving_a_folder_of_pickle_weights_without_permission_exits_2(
    pickled: Path, capsys
) -> None:
    with socket.socket() as taken:  # should it ever load, it fails to listen instead of serving
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"tcp://127.0.0.1:{taken.getsockname()[1]}"
        code = main(["serve", "--model", str(pickled), "--listen", address, "--device", "cpu"])
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and "--allow-pickle" in message


def _header_only_checkpoint(path: Path, shapes: dict[str, tuple[int, ...]]) -> Path:
    save_file({key: torch.zeros(shape) for key, shape in shapes.items()}, str(path))
    return path


def test_checkpoint_families_come_from_the_keys_diffusers_checks(tmp_path: Path) -> None:
    """Key names and shapes as in real SD 2.x and SDXL checkpoints (tiny tensors: only the
    header is read)."""
    unet = "model.diffusion_model."
    sd2 = {
        f"{unet}input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024),
        "cond_stage_model.model.token_embedding.weight": (8, 1024),
    }
    sdxl = {
        f"{unet}input_blocks.0.0.weight": (320, 4, 3, 3),
        "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias": (1280,),
    }
    vae_only = {"encoder.conv_in.weight": (128, 3, 3, 3)}
    assert (
        models.checkpoint_family(_header_only_checkpoint(tmp_path / "a.safetensors", sd2)) == "sd2"
    )
    assert (
        models.checkpoint_family(_header_only_checkpoint(tmp_path / "b.safetensors", sdxl))
        == "sdxl"
    )
    assert (
        models.checkpoint_family(_header_only_checkpoint(tmp_path / "c.safetensors", vae_only))
        is None
    )


def test_folder_families_come_from_model_index_and_the_unet(tmp_path: Path, pipeline_dir) -> None:
    sd2 = tmp_path / "sd2"
    shutil.copytree(pipeline_dir, sd2)
    unet_config = json.loads((sd2 / "unet" / "config.json").read_text())
    (sd2 / "unet" / "config.json").write_text(
        json.dumps({**unet_config, "cross_attention_dim": 1024})
    )
    assert models.folder_family(pipeline_dir) == "sd1"
    assert models.folder_family(sd2) == "sd2"
    index = json.loads((sd2 / "model_index.json").read_text())
    (sd2 / "model_index.json").write_text(json.dumps({**index, "_class_name": "FluxPipeline"}))
    assert models.folder_family(sd2) == "flux"


def test_a_name_is_a_registry_key_never_a_path(library: Path) -> None:
    registry = ModelRegistry([], library / "models")
    assert registry.get("xl/tiny-xl") is not None
    for name in (
        "../models/xl/tiny-xl",
        str(library / "models" / "xl" / "tiny-xl"),
        "xl/../xl/tiny-xl",
    ):
        assert registry.get(name) is None


def test_a_job_check_looks_names_up_and_only_a_rescan_lists_new_downloads(
    pipeline_dir: Path, library: Path, tmp_path: Path
) -> None:
    """`check` runs on the daemon's socket thread for every request: a lookup, never a scan."""
    models_dir, loras_dir = tmp_path / "models", tmp_path / "loras"
    models_dir.mkdir()
    loras_dir.mkdir()
    engine = Engine(
        ModelCache(str(pipeline_dir), device="cpu", registry=ModelRegistry([], models_dir)),
        LoraRegistry(loras_dir),
    )
    shutil.copytree(pipeline_dir, models_dir / "downloaded")
    shutil.copy(library / "loras" / "ink.safetensors", loras_dir)
    new_model = GenerateRequest("a cat", model="downloaded")
    new_lora = GenerateRequest("a cat", loras=(LoraWeight("ink"),))
    for request, code in ((new_model, "unknown_model"), (new_lora, "unknown_lora")):
        with pytest.raises(ProtocolError) as refused:
            engine.check(request)
        assert refused.value.code == code
    engine.rescan()
    engine.check(GenerateRequest("a cat", model="downloaded", loras=(LoraWeight("ink"),)))


# --- the daemon --------------------------------------------------------------------------------


def test_hello_lists_every_model_by_name(library_peer: Peer) -> None:
    hello = library_peer.answer("hello")
    names = {"tiny-sd", "xl/tiny-xl", "xl/tiny-xl-file", "tiny-sd-file", "tiny-sd-turbo"}
    if tiny.is_present():  # the embedded model, once trained
        names.add(tiny.NAME)
    assert set(hello["models"]) == names
    assert "models" in hello["capabilities"]


def test_the_models_op_lists_family_size_and_what_is_loaded(
    library_peer: Peer, library: Path
) -> None:
    library_peer.generate(**JOB, model="tiny-sd")
    listed = listing(library_peer)
    assert listed["tiny-sd"]["loaded"] is True
    assert listed["xl/tiny-xl"]["family"] == "sdxl"
    assert (
        listed["tiny-sd-file"]["size_bytes"]
        == (library / "models" / "tiny-sd-file.safetensors").stat().st_size
    )
    assert {"name", "family", "size_bytes", "loaded", "defaults"} <= set(listed["tiny-sd"])


def test_a_job_names_its_model_and_the_daemon_switches_while_later_jobs_wait(
    library_peer: Peer,
) -> None:
    """Three jobs queued at once on two models run in order; each reports its own model."""
    ids = [
        library_peer.send("generate", **JOB, model="xl/tiny-xl"),
        library_peer.send("generate", **JOB, model="tiny-sd"),
        library_peer.send("generate", **JOB, model="xl/tiny-xl"),
    ]
    results = [library_peer.until(rid)[-1] for rid in ids]
    assert [r["event"] for r in results] == ["result"] * 3
    assert ["Model: xl/tiny-xl" in r["parameters"] for r in results] == [True, False, True]
    assert results[1]["parameters"].endswith("Model: tiny-sd")
    first, third = (
        np.frombuffer(r["images"][0]["data"], np.uint8) for r in (results[0], results[2])
    )
    assert np.array_equal(first, third)  # the SDXL model again, not whatever ran last


CHECKPOINTS = [("tiny-sd", "tiny-sd-file"), ("xl/tiny-xl", "xl/tiny-xl-file")]


@pytest.mark.parametrize(("folder", "checkpoint"), CHECKPOINTS)
def test_a_single_file_checkpoint_loads_the_weights_of_its_diffusers_folder(
    library: Path, pipeline_dir: Path, folder: str, checkpoint: str
) -> None:
    """SD 1.x loads through StableDiffusionPipeline, SDXL (both text encoders) through
    StableDiffusionXLPipeline, as the family detected from the file's keys says."""
    models_dir = library / "models"
    folder_path = pipeline_dir if folder == "tiny-sd" else models_dir / folder
    file = describe(str(models_dir / f"{checkpoint}.safetensors"), checkpoint, str(folder_path))
    from_folder = load_pipeline(describe(str(folder_path), folder), torch.float32)
    assert_same_weights(from_folder, load_pipeline(file, torch.float32))


@pytest.mark.parametrize(("folder", "checkpoint"), CHECKPOINTS)
def test_a_single_file_checkpoint_gives_the_pixels_of_its_diffusers_folder(
    library_peer: Peer, folder: str, checkpoint: str
) -> None:
    from_folder = result_image(library_peer.generate(**JOB, model=folder))
    assert_same_picture(result_image(library_peer.generate(**JOB, model=checkpoint)), from_folder)


def test_the_least_recently_used_model_is_unloaded_beyond_the_count(library_peer: Peer) -> None:
    """max_loaded_models = 2 in the library daemon's config file."""
    for name in ("tiny-sd", "xl/tiny-xl", "tiny-sd-file"):
        assert library_peer.generate(**JOB, model=name)[-1]["event"] == "result"
    loaded = {name for name, entry in listing(library_peer).items() if entry["loaded"]}
    assert loaded == {"xl/tiny-xl", "tiny-sd-file"}


@pytest.mark.parametrize("name", ["no-such-model", "../models/xl/tiny-xl", "/etc/passwd", "old"])
def test_unknown_names_and_paths_are_unknown_model(library_peer: Peer, name: str) -> None:
    events = library_peer.generate(**JOB, model=name)
    assert [e["event"] for e in events] == ["error"]
    assert (events[0]["code"], events[0]["field"]) == ("unknown_model", "model")


def test_a_model_that_fails_to_load_fails_its_job_and_the_previous_model_serves_on(
    library_peer: Peer, library: Path
) -> None:
    library_peer.generate(**JOB, model="tiny-sd")
    resident = library_peer.generate(**JOB, model="tiny-sd")
    assert "loading" not in [e["event"] for e in resident]
    before = result_image(resident)
    # SD-shaped keys, so it is listed as SD 1.x, but no weights the UNet can take.
    broken = library / "models" / "broken.safetensors"
    save_file(
        {f"{models.SD_UNET_PREFIX}input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3)}, str(broken)
    )
    try:
        wait_until(lambda: "broken" in listing(library_peer))  # rescanned: no restart needed
        assert listing(library_peer)["broken"]["family"] == "sd1"
        events = library_peer.generate(**JOB, model="broken")
        assert [e["event"] for e in events] == ["accepted", "started", "loading", "error"]
        assert events[2]["model"] == "broken"
        assert (events[-1]["code"], events[-1]["field"]) == ("model_load_failed", "model")
        # The listed name and what went wrong; the operator's paths stay in the daemon's log.
        assert "'broken'" in events[-1]["message"] and str(library) not in events[-1]["message"]
        assert np.array_equal(result_image(library_peer.generate(**JOB)), before)
        assert listing(library_peer)["broken"]["loaded"] is False
    finally:
        broken.unlink()


def test_the_cli_lists_models_and_generates_with_model_sampler_and_lora(
    library_daemon, tmp_path: Path
) -> None:
    listed = sdbridge("models", "--address", library_daemon.address)
    assert listed.returncode == 0, listed.stderr
    rows = {line.split()[0]: line.split() for line in listed.stdout.splitlines()}
    assert rows["xl/tiny-xl"][1] == "sdxl" and rows["styles/paper"][1] == "lora"
    out = tmp_path / "turbo.png"
    run = sdbridge(
        "generate", "a cat", "--address", library_daemon.address, "--model", "tiny-sd-turbo",
        "--scheduler", "DPM++ 2M", "--lora", "ink:0.5", "--seed", "3", "-o", str(out),
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "step 4/4" in run.stderr  # the turbo preset's steps
    with Image.open(out) as image:
        assert image.size == (64, 64)
    saved = run.stdout.split("saved by the daemon as ")[1].rstrip(")\n")
    with Image.open(saved) as png:
        assert "Sampler: DPM++ 2M," in png.text["parameters"]
        assert "Model: tiny-sd-turbo" in png.text["parameters"]


def test_a_model_of_unknown_family_is_named_once_loaded(pipeline_dir: Path) -> None:
    """A hub model not yet in the cache is listed as `unknown` until its configs arrive."""
    entry = ModelEntry("some/hub-model", str(pipeline_dir), models.UNKNOWN, 0)
    registry = ModelRegistry([entry])
    engine = Engine(ModelCache("some/hub-model", device="cpu", registry=registry))
    assert registry.get("some/hub-model").family == "sd1"
    assert engine.native_size == 64


def test_linked_folders_are_scanned_once_even_in_a_loop(library: Path, tmp_path: Path) -> None:
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "a1111").symlink_to(library / "models" / "xl", target_is_directory=True)
    (folder / "loop").symlink_to(folder, target_is_directory=True)
    names = {entry.name for entry in scan(folder)}
    assert names == {"a1111/tiny-xl", "a1111/tiny-xl-file"}
