"""The daemon's TOML config file: defaults < file < environment < flags, and `sdbridge config`
says where each value came from."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch
from diffusers.models.attention_processor import SlicedAttnProcessor
from helpers import ask, sdbridge

from sdbridge.daemon.cache import MemoryOptions, ModelCache
from sdbridge.daemon.engine import Engine
from sdbridge.daemon.images import job_memory_bytes
from sdbridge.daemon.settings import SettingsError, default_config_path, load_settings
from sdbridge.wire import protocol

NO_FLAGS: dict[str, object] = {}


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_each_source_beats_the_one_before_and_is_remembered(tmp_path: Path) -> None:
    config = write(
        tmp_path / "config.toml",
        'device = "cpu"\nlisten = "tcp://127.0.0.1:9000"\nmodels_dir = "~/art/models"\n'
        "vae_tiling = true\n[limits]\nmax_steps = 40\nmax_images = 2\n",
    )
    environ = {"SDBRIDGE_LISTEN": "tcp://127.0.0.1:9001", "SDBRIDGE_ATTENTION_SLICING": "yes"}
    flags = {"listen": "tcp://127.0.0.1:9002", "max_steps": 50}
    settings = load_settings(str(config), flags, environ)
    assert settings.listen == "tcp://127.0.0.1:9002" and settings.sources["listen"] == "flag"
    assert settings.device == "cpu" and settings.sources["device"] == "file"
    assert settings.models_dir == Path.home() / "art" / "models"
    assert settings.vae_tiling is True and settings.sources["vae_tiling"] == "file"
    assert settings.attention_slicing is True
    assert settings.sources["attention_slicing"] == "environment"
    assert settings.dtype == "auto" and settings.sources["dtype"] == "default"
    assert settings.limits.max_steps == 50 and settings.sources["limits.max_steps"] == "flag"
    assert settings.limits.max_images == 2 and settings.sources["limits.max_images"] == "file"
    assert settings.limits.max_side == protocol.Limits().max_side


def test_per_model_tables_hold_presets_and_sampler_defaults(tmp_path: Path) -> None:
    config = write(
        tmp_path / "config.toml",
        '[models."sd_xl_turbo"]\npreset = "turbo"\nnum_inference_steps = 2\n'
        '[models."dreamshaper"]\nscheduler = "DPM++ 2M Karras"\nguidance_scale = 5\n',
    )
    settings = load_settings(str(config), NO_FLAGS, {})
    assert settings.models == {
        "sd_xl_turbo": {"preset": "turbo", "num_inference_steps": 2},
        "dreamshaper": {"scheduler": "DPM++ 2M Karras", "guidance_scale": 5},
    }


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('devise = "cpu"\n', "unknown setting 'devise'"),
        ('device = "tpu"\n', "device must be one of auto, cuda, mps, cpu"),
        ('max_loaded_models = "two"\n', "max_loaded_models must be an integer"),
        ("allow_pickle = 1\n", "allow_pickle must be true or false"),
        ("[limits]\nmax_side = 0\n", "max_side must be a positive integer"),
        ("[limits]\nmax_sides = 10\n", "[limits] has no 'max_sides'"),
        ('[models.x]\npreset = "fast"\n', "preset must be one of standard, turbo"),
        ('[models.x]\nscheduler = "Euler b"\n', "scheduler must be one of Euler, Euler a"),
        ("[models.x]\nsteps = 4\n", "unknown key 'steps'"),
        ("device = \n", "not valid TOML"),
    ],
)
def test_mistakes_in_the_file_are_named(tmp_path: Path, text: str, message: str) -> None:
    config = write(tmp_path / "config.toml", text)
    with pytest.raises(SettingsError) as caught:
        load_settings(str(config), NO_FLAGS, {})
    assert message in str(caught.value)


def test_a_missing_file_is_an_error_only_when_named(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="not found"):
        load_settings(str(tmp_path / "nope.toml"), NO_FLAGS, {})
    with pytest.raises(SettingsError, match="not found"):
        load_settings(None, NO_FLAGS, {"SDBRIDGE_CONFIG": str(tmp_path / "nope.toml")})
    settings = load_settings(None, NO_FLAGS, {})  # the per-user default, absent here
    assert settings.path == default_config_path() and not settings.file_found
    assert str(default_config_path()).startswith(os.environ["XDG_CONFIG_HOME"])


def test_sdbridge_config_prints_every_value_with_its_source(tmp_path: Path) -> None:
    config = write(
        tmp_path / "config.toml",
        'dtype = "fp32"\n[limits]\nmax_queue = 5\n[models."sd-turbo"]\npreset = "turbo"\n',
    )
    run = sdbridge(
        "config", "--config", str(config), "--device", "cpu",
        env={"SDBRIDGE_OUTPUT_DIR": str(tmp_path / "out")},
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    lines = {line.split("=")[0].strip(): line for line in run.stdout.splitlines() if "=" in line}
    assert lines["device"].endswith("# flag") and '"cpu"' in lines["device"]
    assert lines["dtype"].endswith("# file")
    assert lines["output_dir"].endswith("# environment") and str(tmp_path / "out") in run.stdout
    assert lines["listen"].endswith("# default")
    assert lines["max_queue"].endswith("# file") and "= 5" in lines["max_queue"]
    assert '[models."sd-turbo"]' in run.stdout
    assert run.stdout.startswith(f"# config file: {config}")
    bad = write(tmp_path / "bad.toml", "devise = 1\n")
    run = sdbridge("config", "--config", str(bad))
    assert run.returncode == 2 and "unknown setting 'devise'" in run.stderr


def test_sdbridge_config_shows_the_limits_a_daemon_sizes_from_its_devices_memory(
    tmp_path: Path,
) -> None:
    """Not `Limits()`' fixed values: what a daemon on this machine's CPU would use, said to come
    from the device's memory; max_message_bytes follows the operator's max_pixels."""
    config = write(tmp_path / "config.toml", "")
    sized = protocol.Limits.for_memory(job_memory_bytes(torch.device("cpu")))
    lines = config_lines(sdbridge("config", "--config", str(config)))
    for name in ("max_pixels", "max_message_bytes"):
        value, source = lines[name]
        assert value == str(getattr(sized, name))
        assert source.startswith("from the device's memory at start (here for ")
    lines = config_lines(sdbridge("config", "--config", str(config), "--max-pixels", "100000"))
    assert lines["max_pixels"] == ("100000", "flag")
    assert lines["max_message_bytes"] == (str(8 * 100_000 + 2**20), "from max_pixels")


def config_lines(run: subprocess.CompletedProcess) -> dict[str, tuple[str, str]]:
    """`sdbridge config`'s lines as name -> (value, source comment)."""
    assert run.returncode == 0, run.stderr
    lines = {}
    for line in run.stdout.splitlines():
        setting, _, source = line.partition(" # ")
        if "=" in setting:
            name, _, value = setting.partition("=")
            lines[name.strip()] = (value.strip(), source.strip())
    return lines


def test_the_daemon_takes_its_limits_from_the_file_and_flags_beat_it(library_daemon) -> None:
    """The library daemon's file sets max_images = 3 and max_steps = 100, its command line
    --max-steps 120."""
    address = library_daemon.address
    hello = ask(address, {"v": 1, "op": "hello", "id": "h"})
    assert hello["limits"]["max_steps"] == 120 and hello["limits"]["max_images"] == 3
    refused = ask(address, {"v": 1, "op": "generate", "id": "g", "prompt": "x", "num_images": 4})
    assert (refused["code"], refused["field"]) == ("out_of_range", "num_images")


def test_memory_options_reach_the_pipelines(pipeline_dir: Path) -> None:
    memory = MemoryOptions(attention_slicing=True, vae_tiling=True)
    engine = Engine(ModelCache(str(pipeline_dir), device="cpu", memory=memory))
    loaded = engine.activate(engine.model)
    assert loaded.txt2img.vae.use_tiling
    processors = loaded.txt2img.unet.attn_processors.values()
    assert processors and all(isinstance(p, SlicedAttnProcessor) for p in processors)
    assert loaded.inpaint.unet is loaded.txt2img.unet  # one set of weights for all modes
