"""The daemon's settings: built-in defaults, then a TOML file, then the environment, then
command-line flags, each beating the one before; every value remembers where it came from.

The file lives at a per-user path (`default_config_path`), or wherever `--config` or
`SDBRIDGE_CONFIG` says. Each top-level setting `name` can also come from `SDBRIDGE_NAME` in the
environment. Unknown keys are errors, so a typo does not silently leave a default in place.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..wire import protocol
from .outputs import default_output_dir
from .presets import PRESETS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

CONFIG_ENV = "SDBRIDGE_CONFIG"
ENV_PREFIX = "SDBRIDGE_"
DEVICES = ("auto", "cuda", "mps", "cpu")
DTYPES = ("auto", "fp16", "bf16", "fp32")
# What `[models."NAME"]` tables may set, and the types of those values.
MODEL_KEYS: dict[str, type | tuple[type, ...]] = {
    "config": str,
    "preset": str,
    "num_inference_steps": int,
    "guidance_scale": (int, float),
    "scheduler": str,
    "timestep_spacing": str,
}
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


class SettingsError(ValueError):
    pass


def _user_dir(kind: str) -> Path:
    """The per-user folder for `config` or `data`, as each platform keeps them."""
    home = Path.home()
    if sys.platform == "win32":
        base = Path(os.environ.get("APPDATA") or home / "AppData" / "Roaming")
    elif sys.platform == "darwin":
        base = home / "Library" / "Application Support"
    elif kind == "config":
        base = Path(os.environ.get("XDG_CONFIG_HOME") or home / ".config")
    else:
        base = Path(os.environ.get("XDG_DATA_HOME") or home / ".local" / "share")
    return base / "sdbridge"


def default_config_path() -> Path:
    return _user_dir("config") / "config.toml"


@dataclass(frozen=True)
class Option:
    name: str
    kind: type
    default: Any
    help: str
    choices: tuple[str, ...] | None = None


def options() -> list[Option]:
    """Every top-level setting, with its built-in default."""
    data = _user_dir("data")
    return [
        Option("listen", str, protocol.DEFAULT_ADDRESS, "address to bind, tcp://HOST:PORT"),
        Option("model", str, None, "model served first: a name, folder, .safetensors or hub id"),
        Option("model_config", str, None, "diffusers folder with the configs for --model's file"),
        Option("models_dir", Path, data / "models", "folder of models listed to clients"),
        Option("loras_dir", Path, data / "loras", "folder of LoRA .safetensors files"),
        Option(
            "controlnets_dir",
            Path,
            data / "controlnets",
            "folder of ControlNets: diffusers folders and .safetensors files",
        ),
        Option("output_dir", Path, default_output_dir(), "where finished images are saved"),
        Option("device", str, "auto", "auto: CUDA, then MPS, then CPU", DEVICES),
        Option("dtype", str, "auto", "auto: fp16 on CUDA, fp32 elsewhere", DTYPES),
        Option("max_loaded_models", int, 1, "models kept resident; the least recently used goes"),
        Option("allow_pickle", bool, False, "list .ckpt/.pt/.bin files (they can run code)"),
        Option("attention_slicing", bool, False, "less memory in attention, ~10% slower"),
        Option("vae_tiling", bool, False, "decode large images tile by tile"),
        Option("cpu_offload", bool, False, "CUDA: keep components on the CPU until they run"),
        Option(
            "cluster",
            str,
            None,
            "run jobs on Ray workers: local, auto or HOST:PORT of a Ray head (docs/cluster.md)",
        ),
        Option(
            "workers",
            int,
            0,
            "cluster workers; 0: one per GPU of the cluster (one CPU worker if it has none)",
        ),
        Option(
            "token_file",
            str,
            None,
            f"file with the secret clients must present (or ${protocol.TOKEN_ENV}); "
            "required to listen beyond loopback",
        ),
    ]


@dataclass
class Settings:
    values: dict[str, Any]
    limits: protocol.Limits
    models: dict[str, dict[str, Any]]
    path: Path
    file_found: bool
    # "listen", "limits.max_side", "models.NAME.preset" -> default / file / environment / flag
    sources: dict[str, str] = field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["values"][name]
        except KeyError:
            raise AttributeError(name) from None

    def limits_for(self, memory_bytes: int) -> protocol.Limits:
        """The operator's limits, the others sized for a device of `memory_bytes`."""
        given = {
            name: value
            for name, value in self.limits.to_dict().items()
            if self.sources[f"limits.{name}"] != "default"
        }
        return protocol.Limits.for_memory(memory_bytes, **given)

    def render(self, ram_bytes: int) -> str:
        """The effective configuration as TOML, each value commented with its source. The
        limits a daemon sizes from its device's memory at start are shown for `ram_bytes`, the
        memory of a daemon on this machine's CPU."""
        state = "" if self.file_found else " (not found: nothing read from it)"
        lines = [f"# config file: {self.path}{state}"]
        for option in options():
            value = self.values[option.name]
            lines.append(_line(option.name, value, self.sources[option.name]))
        lines += ["", "[limits]"]
        for name, value in self.limits_for(ram_bytes).to_dict().items():
            source = self.sources[f"limits.{name}"]
            if source == "default" and name in protocol.MEMORY_LIMITS:
                if name == "max_message_bytes" and self.sources["limits.max_pixels"] != "default":
                    source = "from max_pixels"
                else:
                    source = (
                        "from the device's memory at start "
                        f"(here for {ram_bytes / 2**30:.0f} GiB of RAM)"
                    )
            lines.append(_line(name, value, source))
        for model, table in self.models.items():
            lines += ["", f"[models.{_toml(model)}]"]
            for key, value in table.items():
                lines.append(_line(key, value, "file"))
        return "\n".join(lines)


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


def _line(name: str, value: Any, source: str) -> str:
    setting = f"# {name} is not set" if value is None else f"{name} = {_toml(value)}"
    return f"{setting:<60} # {source}"


def _convert(option: Option, value: Any, where: str) -> Any:
    """A value from the file (typed) or the environment (text) as the option's type."""
    if isinstance(value, str) and option.kind is bool:
        if value.lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
            raise SettingsError(f"{where}: {option.name} must be true or false, got {value!r}")
        value = value.lower() in ("1", "true", "yes", "on")
    elif isinstance(value, str) and option.kind is int:
        try:
            value = int(value)
        except ValueError:
            raise SettingsError(f"{where}: {option.name} must be an integer") from None
    if option.kind is Path and isinstance(value, (str, Path)):
        value = Path(value).expanduser()
    elif isinstance(value, bool) != (option.kind is bool) or not isinstance(value, option.kind):
        kind = {bool: "true or false", int: "an integer"}.get(option.kind, "a string")
        raise SettingsError(f"{where}: {option.name} must be {kind}")
    if option.choices and value not in option.choices:
        raise SettingsError(f"{where}: {option.name} must be one of {', '.join(option.choices)}")
    return value


def _read_file(path: Path, required: bool) -> dict[str, Any] | None:
    if not path.is_file():
        if required:
            raise SettingsError(f"config file {path} not found")
        return None
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise SettingsError(f"{path}: not valid TOML: {exc}") from exc


def _model_tables(tables: Any, where: str) -> dict[str, dict[str, Any]]:
    if not isinstance(tables, dict):
        raise SettingsError(f"{where}: [models] must hold one table per model name")
    models = {}
    for name, table in tables.items():
        here = f"{where}: [models.{_toml(name)}]"
        if not isinstance(table, dict):
            raise SettingsError(f"{here} must be a table")
        for key, value in table.items():
            kind = MODEL_KEYS.get(key)
            if kind is None:
                raise SettingsError(f"{here}: unknown key {key!r}; known: {', '.join(MODEL_KEYS)}")
            if isinstance(value, bool) or not isinstance(value, kind):
                raise SettingsError(f"{here}: {key} has the wrong type")
        allowed: dict[str, Any] = {"preset": PRESETS, "timestep_spacing": TIMESTEP_SPACINGS}
        if "scheduler" in table:
            from .schedulers import SAMPLERS  # imports diffusers: only when it is needed

            allowed["scheduler"] = SAMPLERS
        for key, choices in allowed.items():
            if key in table and table[key] not in choices:
                raise SettingsError(f"{here}: {key} must be one of {', '.join(choices)}")
        models[name] = dict(table)
    return models


def load_settings(
    config: str | None, flags: Mapping[str, Any], environ: Mapping[str, str]
) -> Settings:
    """`flags`: the command line's values, None where a flag was not given."""
    path = Path(config or environ.get(CONFIG_ENV) or default_config_path()).expanduser()
    document = _read_file(path, required=bool(config or environ.get(CONFIG_ENV))) or {}
    where = str(path)
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    known = {option.name for option in options()} | {"limits", "models"}
    for key in document:
        if key not in known:
            raise SettingsError(f"{where}: unknown setting {key!r}")
    for option in options():
        values[option.name], sources[option.name] = option.default, "default"
        env_name = ENV_PREFIX + option.name.upper()
        for source, found, value in (
            ("file", option.name in document, document.get(option.name)),
            ("environment", bool(environ.get(env_name)), environ.get(env_name)),
            ("flag", flags.get(option.name) is not None, flags.get(option.name)),
        ):
            if found:
                origin = {"file": where, "environment": env_name, "flag": "command line"}[source]
                values[option.name] = _convert(option, value, origin)
                sources[option.name] = source
    limit_table = document.get("limits", {})
    if not isinstance(limit_table, dict):
        raise SettingsError(f"{where}: [limits] must be a table")
    limits = {}
    for name, default in protocol.Limits().to_dict().items():
        limits[name], sources[f"limits.{name}"] = default, "default"
        if name in limit_table:
            limits[name], sources[f"limits.{name}"] = limit_table[name], "file"
        if flags.get(name) is not None:
            limits[name], sources[f"limits.{name}"] = flags[name], "flag"
    unknown = set(limit_table) - set(limits)
    if unknown:
        raise SettingsError(f"{where}: [limits] has no {sorted(unknown)[0]!r}")
    try:
        checked = protocol.Limits(**limits)
    except (TypeError, ValueError) as exc:
        raise SettingsError(f"{where}: [limits]: {exc}") from exc
    models = _model_tables(document["models"], where) if "models" in document else {}
    return Settings(values, checked, models, path, path.is_file(), sources)
