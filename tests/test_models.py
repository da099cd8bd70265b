"""`sdbridge serve --model SPEC`: every kind of model a user names loads, bad names fail clearly.

A diffusers folder, a hub id (from the hub cache, offline) and an original-format single-file
`.safetensors` checkpoint with `--model-config` all load through diffusers' own loading code and
hold the same weights: the same pixels for the same seed, exactly from the same files and within
a rounding tolerance from the checkpoint (tests/checkpoints.py says why).
"""

from __future__ import annotations

import hashlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from checkpoints import assert_same_picture, write_single_file_checkpoint
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from helpers import TIMEOUT, Peer, ask, result_image
from huggingface_hub import constants as hub_constants
from safetensors import safe_open

from sdbridge.cli import main
from sdbridge.daemon.cache import ModelCache
from sdbridge.daemon.engine import Engine
from sdbridge.wire.protocol import GenerateRequest

HUB_ID = "sdbridge-test/tiny-sd"
JOB = {"prompt": "a red circle on a blue background", "num_inference_steps": 4, "seed": 42}


def engine_image(engine: Engine) -> np.ndarray:
    [generated] = engine.run(
        GenerateRequest(**JOB), lambda *_: None, lambda *_: None, lambda: False
    )
    return np.asarray(generated.image)


def daemon_image(address: str) -> np.ndarray:
    """The RGB pixels of one job, asked of a running daemon."""
    peer = Peer(address)
    try:
        return result_image(peer.generate(**JOB))[..., :3]
    finally:
        peer.close()


def daemon_model(address: str) -> str:
    """The model a running daemon says, in its hello, that it serves."""
    hello = ask(address, {"v": 1, "op": "hello", "id": "hello"}, timeout=TIMEOUT)
    assert hello is not None, "no hello from the daemon"
    return hello["model"]


def write_hub_cache(cache: Path, repo_id: str, folder: Path) -> None:
    """`folder` laid out as huggingface_hub caches a download of `repo_id`: content-named blobs,
    a snapshot of links to them named by commit, and `refs/main` naming that commit."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    for file in sorted(folder.rglob("*")):
        if not file.is_file() or file.relative_to(folder).parts[0].startswith("_"):
            continue
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / file.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


@pytest.fixture(scope="module")
def folder_engine(pipeline_dir: Path) -> Engine:
    return Engine(ModelCache(str(pipeline_dir), device="cpu"))


@pytest.fixture(scope="module")
def reference(folder_engine: Engine) -> np.ndarray:
    """The image the diffusers folder gives for JOB: every other spec must give exactly this."""
    return engine_image(folder_engine)


@pytest.fixture(scope="module")
def folder_pipeline(pipeline_dir: Path) -> StableDiffusionPipeline:
    return StableDiffusionPipeline.from_pretrained(pipeline_dir)


@pytest.fixture(scope="module")
def checkpoint(
    folder_pipeline: StableDiffusionPipeline, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """The folder's model as the single `.safetensors` file an AUTOMATIC1111 user has."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny-sd.safetensors"
    return write_single_file_checkpoint(folder_pipeline, path)


@pytest.fixture(scope="module")
def hub_cache_dir(pipeline_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = tmp_path_factory.mktemp("hub")
    write_hub_cache(cache, HUB_ID, pipeline_dir)
    return cache


@pytest.fixture
def hub_cache(hub_cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """huggingface_hub uses the test cache, offline, here and in daemons started from here."""
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache_dir))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # This process's huggingface_hub read the environment when it was imported.
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(hub_cache_dir))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    return hub_cache_dir


def test_a_diffusers_folder_loads_and_generates(folder_engine: Engine, reference) -> None:
    assert folder_engine.model == "tiny-sd"
    assert reference.shape == (64, 64, 3)
    assert reference.std() > 1.0  # an image, not a flat fill


def test_a_hub_id_loads_from_the_hub_cache_offline(hub_cache: Path, reference) -> None:
    assert not Path(HUB_ID).exists()  # nothing local by that name: the hub-id path loads it
    engine = Engine(ModelCache(HUB_ID, device="cpu"))
    assert engine.model == HUB_ID
    assert np.array_equal(engine_image(engine), reference)


def test_the_daemon_serves_a_hub_id(hub_cache: Path, daemon_factory, reference) -> None:
    daemon = daemon_factory("--device", "cpu", model=HUB_ID)
    assert daemon_model(daemon.address) == HUB_ID
    assert np.array_equal(daemon_image(daemon.address), reference)


def test_a_checkpoint_holds_every_weight_under_its_original_name(checkpoint: Path) -> None:
    with safe_open(str(checkpoint), "pt") as file:
        keys = set(file.keys())
    prefixes = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.")
    assert all(key.startswith(prefixes) for key in keys)
    assert {
        "model.diffusion_model.input_blocks.0.0.weight",
        "model.diffusion_model.input_blocks.1.0.in_layers.0.weight",
        "model.diffusion_model.middle_block.1.proj_in.weight",
        "model.diffusion_model.output_blocks.1.2.conv.weight",
        "model.diffusion_model.out.2.bias",
        "first_stage_model.encoder.mid.attn_1.q.weight",
        "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight",
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
    } <= keys


def test_a_checkpoint_loads_back_with_every_tensor_equal(
    checkpoint: Path, pipeline_dir: Path, folder_pipeline: StableDiffusionPipeline
) -> None:
    original = folder_pipeline
    loaded = StableDiffusionPipeline.from_single_file(str(checkpoint), config=str(pipeline_dir))
    for name in ("unet", "vae", "text_encoder"):
        want, got = getattr(original, name).state_dict(), getattr(loaded, name).state_dict()
        assert want.keys() == got.keys(), name
        unequal = [key for key in want if not torch.equal(want[key], got[key])]
        assert not unequal, f"{name}: {unequal}"


def test_checkpoints_follow_the_full_sd15_block_layout(
    folder_pipeline: StableDiffusionPipeline, tmp_path: Path
) -> None:
    """Two layers per block, four blocks, attention in three: the numbering of real SD 1.5."""
    base = folder_pipeline
    cross = ("CrossAttnDownBlock2D",) * 3
    unet = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=2,
        down_block_types=(*cross, "DownBlock2D"),
        up_block_types=("UpBlock2D", *(t.replace("Down", "Up") for t in cross)),
        cross_attention_dim=base.text_encoder.config.hidden_size,
        attention_head_dim=4,
        norm_num_groups=4,
    )
    vae = AutoencoderKL(
        block_out_channels=(4, 8, 8, 8),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        norm_num_groups=4,
        latent_channels=4,
    )
    pipe = StableDiffusionPipeline(**{**base.components, "unet": unet, "vae": vae})
    path = write_single_file_checkpoint(pipe, tmp_path / "sd15-layout.safetensors")
    for model in (unet, vae):
        model.save_config(tmp_path / type(model).__name__)
        loaded = type(model).from_single_file(
            str(path), config=str(tmp_path / type(model).__name__)
        )
        want, got = model.state_dict(), loaded.state_dict()
        assert want.keys() == got.keys()
        assert all(torch.equal(want[key], got[key]) for key in want), type(model).__name__


def test_a_checkpoint_with_model_config_gives_the_folders_image(
    checkpoint: Path, pipeline_dir: Path, reference
) -> None:
    engine = Engine(ModelCache(str(checkpoint), device="cpu", config=str(pipeline_dir)))
    assert engine.model == "tiny-sd"
    assert_same_picture(engine_image(engine), reference)


def test_the_daemon_serves_a_checkpoint(
    checkpoint: Path, pipeline_dir: Path, daemon_factory, reference
) -> None:
    daemon = daemon_factory(
        "--model-config", str(pipeline_dir), "--device", "cpu", model=checkpoint
    )
    assert daemon_model(daemon.address) == "tiny-sd"
    assert_same_picture(daemon_image(daemon.address), reference)


# name: (spec, what the message must say). Relative specs are relative to a working folder that
# holds `empty/` and `model.ckpt`; CHECKPOINT stands for the single-file checkpoint.
BAD_SPECS = {
    "missing folder": ("no-such-model", ["not found"]),
    "missing checkpoint": ("models/sd15.safetensors", ["checkpoint", "not found"]),
    "folder without model_index.json": ("empty", ["no model_index.json"]),
    ".ckpt file": ("model.ckpt", ["only .safetensors"]),
    "unknown hub id offline": (
        "sdbridge-test/no-such-model",
        ["could not be found in the hub cache or downloaded", "offline"],
    ),
    "checkpoint without --model-config offline": ("CHECKPOINT", ["--model-config FOLDER"]),
}


@pytest.fixture(scope="module")
def taken_address() -> Iterator[str]:
    """Should a bad spec ever load, the daemon fails to listen here instead of serving forever."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield f"tcp://127.0.0.1:{sock.getsockname()[1]}"


@pytest.fixture(scope="module")
def bad_spec_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    workdir = tmp_path_factory.mktemp("bad-specs")
    (workdir / "empty").mkdir()
    (workdir / "model.ckpt").write_bytes(b"PK\x03\x04 a pickled checkpoint")
    (workdir / "hub-cache").mkdir()
    return workdir


@pytest.mark.parametrize("name", BAD_SPECS)
def test_a_bad_spec_exits_2_with_a_clear_message(
    name: str, bad_spec_dir: Path, checkpoint: Path, taken_address: str, monkeypatch, capsys
) -> None:
    """`main` returns `sdbridge serve`'s exit code (test_cli shows it in a real process)."""
    spec, fragments = BAD_SPECS[name]
    spec = str(checkpoint) if spec == "CHECKPOINT" else spec
    monkeypatch.chdir(bad_spec_dir)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(bad_spec_dir / "hub-cache"))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    code = main(["serve", "--model", spec, "--listen", taken_address, "--device", "cpu"])
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2
    assert message.startswith(f"sdbridge: cannot load model {spec!r}: ")
    for fragment in fragments:
        assert fragment in message
