"""The models a daemon can serve: what is on disk, which family each one is, how to load it.

A models folder holds diffusers folders (with `model_index.json`) and single-file checkpoints as
artists download them from model sites. Each becomes a `ModelEntry` under a name that is its
path relative to the folder, without suffix; requests name models by these registry keys only,
never by path, so a request cannot reach outside the folder.

Families follow diffusers' own detection: `model_index.json` names the pipeline class of a
folder, and `infer_diffusers_model_type` reads a checkpoint's keys (here only the safetensors
header, not the weights). The family then picks the auto pipeline that loads it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from diffusers import DiffusionPipeline
from diffusers.loaders.single_file_utils import infer_diffusers_model_type
from diffusers.models.model_loading_utils import load_state_dict
from diffusers.pipelines.auto_pipeline import (
    AUTO_IMAGE2IMAGE_PIPELINES_MAPPING,
    AUTO_INPAINT_PIPELINES_MAPPING,
    AUTO_TEXT2IMAGE_PIPELINES_MAPPING,
    AutoPipelineForText2Image,
)
from huggingface_hub import constants as hub_constants
from huggingface_hub import try_to_load_from_cache
from safetensors import safe_open

log = logging.getLogger(__name__)

SAFE_SUFFIXES = (".safetensors",)
# Pickle files can run code when loaded: only an operator's explicit flag lets them in.
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
UNKNOWN = "unknown"

# Our family names for the auto-pipeline keys whose single architecture has several generations
# told apart by the UNet's cross-attention width; any other family is the auto-pipeline key.
SD1, SD2, SDXL = "sd1", "sd2", "sdxl"
FAMILY_PIPELINE_KEY = {
    SD1: "stable-diffusion",
    SD2: "stable-diffusion",
    SDXL: "stable-diffusion-xl",
}
SD2_CROSS_ATTENTION_DIM = 1024
# `infer_diffusers_model_type` names -> family; checkpoints of other types (ControlNets, video
# models, VAEs, ...) are not text-to-image models this daemon serves.
CHECKPOINT_FAMILIES = {
    "v1": SD1,
    "v2": SD2,
    "xl_base": SDXL,
    "playground-v2-5": SDXL,
    "sd3": "stable-diffusion-3",
    "sd35_medium": "stable-diffusion-3",
    "sd35_large": "stable-diffusion-3",
    "flux-dev": "flux",
    "flux-schnell": "flux",
}
# `infer_diffusers_model_type` answers "v1" when nothing else matches: demand an SD UNet.
SD_UNET_PREFIX = "model.diffusion_model."


class ModelRefused(ValueError):
    """A model this daemon will not load, said without paths: clients may be shown it."""


def pickle_components(folder: Path) -> list[str]:
    """The components of a diffusers folder whose weights exist only as pickle files."""
    return sorted(
        part.name
        for part in folder.iterdir()
        if part.is_dir()
        and any(file.suffix in PICKLE_SUFFIXES for file in part.iterdir())
        and not any(file.suffix in SAFE_SUFFIXES for file in part.iterdir())
    )


def _refuse_pickle(folder: Path) -> None:
    pickled = pickle_components(folder)
    if pickled:
        raise ModelRefused(
            f"its {', '.join(pickled)} weights are pickle files only (.bin), which can run code "
            "when loaded: --allow-pickle lets them in"
        )


@dataclass(frozen=True)
class ModelEntry:
    name: str
    path: str  # a folder, a checkpoint file or a hub id
    family: str
    size_bytes: int
    # A diffusers folder with the configs for a single-file checkpoint; without it diffusers
    # fetches the reference configs of the family from the hub.
    config: str | None = None
    # The scheduler class a folder's model_index.json names (few-step detection before loading).
    scheduler: str = ""

    def to_dict(self, loaded: bool) -> dict[str, Any]:
        return {
            "name": self.name,
            "family": self.family,
            "size_bytes": self.size_bytes,
            "loaded": loaded,
        }


class _HeaderShapes(Mapping[str, Any]):
    """A safetensors file's keys and tensor shapes, read from its header, for key-based
    detection: `infer_diffusers_model_type` only asks `key in checkpoint` and `.shape`."""

    def __init__(self, path: Path) -> None:
        self._file = safe_open(str(path), framework="pt")
        self._keys = set(self._file.keys())

    def __getitem__(self, key: str) -> Any:
        if key not in self._keys:
            raise KeyError(key)
        return SimpleNamespace(shape=torch.Size(self._file.get_slice(key).get_shape()))

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def _pipeline_key(class_name: str) -> str | None:
    """The auto-pipeline key (e.g. `stable-diffusion-xl`) of a pipeline class name."""
    for mapping in (
        AUTO_TEXT2IMAGE_PIPELINES_MAPPING,
        AUTO_IMAGE2IMAGE_PIPELINES_MAPPING,
        AUTO_INPAINT_PIPELINES_MAPPING,
    ):
        for key, pipeline in mapping.items():
            if pipeline.__name__ == class_name:
                return key
    return None


def _family_from_configs(index: Mapping[str, Any], unet: Mapping[str, Any] | None) -> str | None:
    key = _pipeline_key(index.get("_class_name", ""))
    if key == "stable-diffusion":
        cross = (unet or {}).get("cross_attention_dim")
        return SD2 if cross == SD2_CROSS_ATTENTION_DIM else SD1
    if key == "stable-diffusion-xl":
        return SDXL
    return key


def _read_json(path: Path | str | None) -> dict[str, Any] | None:
    if path is None or not Path(path).is_file():
        return None
    return json.loads(Path(path).read_text())


def folder_family(folder: Path) -> str | None:
    """The family of a diffusers folder, or None if no auto pipeline generates images with it."""
    index = _read_json(folder / "model_index.json")
    if index is None:
        return None
    return _family_from_configs(index, _read_json(folder / "unet" / "config.json"))


def hub_family(repo_id: str) -> str:
    """The family of a hub model if its configs are in the local cache; `unknown` otherwise."""
    index = _read_json(_cached(repo_id, "model_index.json"))
    if index is None:
        return UNKNOWN
    return _family_from_configs(index, _read_json(_cached(repo_id, "unet/config.json"))) or UNKNOWN


def _cached(repo_id: str, filename: str) -> str | None:
    found = try_to_load_from_cache(repo_id, filename)
    return found if isinstance(found, str) else None


def checkpoint_family(path: Path) -> str | None:
    """The family of a single-file checkpoint from its keys, or None if it is no image model."""
    stat = path.stat()
    return _checkpoint_family(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


# Keyed by size and mtime too: rescans read each file once, a replaced file again.
@functools.lru_cache(maxsize=1024)
def _checkpoint_family(path_name: str, size: int, mtime_ns: int) -> str | None:
    path = Path(path_name)
    if path.suffix in SAFE_SUFFIXES:
        keys: Mapping[str, Any] = _HeaderShapes(path)
    else:
        keys = load_state_dict(str(path))  # a pickle: reached only when the operator allowed it
        while "state_dict" in keys:
            keys = keys["state_dict"]
    model_type = infer_diffusers_model_type(keys)
    if model_type == "v1" and not any(key.startswith(SD_UNET_PREFIX) for key in keys):
        return None
    return CHECKPOINT_FAMILIES.get(model_type)


def pipeline_family(pipe: DiffusionPipeline) -> str:
    """The family of a loaded pipeline (for hub ids that were not in the cache before)."""
    unet = getattr(pipe, "unet", None)
    return (
        _family_from_configs(
            {"_class_name": type(pipe).__name__}, dict(unet.config) if unet is not None else None
        )
        or UNKNOWN
    )


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    # stat() follows the hub cache's symlinks to the blobs.
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def describe(
    spec: str, name: str, config: str | None = None, allow_pickle: bool = False
) -> ModelEntry:
    """An entry for a model the operator names: a folder, a checkpoint file or a hub id."""
    path = Path(spec).expanduser()
    if path.is_dir():
        family = folder_family(path)
        if family is None:
            raise ValueError(f"{path} is not a diffusers model folder (no model_index.json)")
        if not allow_pickle:
            _refuse_pickle(path)
        index = _read_json(path / "model_index.json") or {}
        scheduler = index.get("scheduler", [None, ""])[-1] or ""
        return ModelEntry(name, str(path), family, _size(path), scheduler=scheduler)
    if path.is_file():
        allowed = SAFE_SUFFIXES + (PICKLE_SUFFIXES if allow_pickle else ())
        if path.suffix not in allowed:
            raise ValueError(
                f"{path}: only .safetensors checkpoints are loaded "
                "(pickle checkpoints can run code when loaded: --allow-pickle lets them in)"
            )
        family = checkpoint_family(path)
        if family is None:
            raise ValueError(f"{path}: not a text-to-image checkpoint diffusers can load")
        return ModelEntry(name, str(path), family, _size(path), config)
    if path.suffix in SAFE_SUFFIXES + PICKLE_SUFFIXES:
        raise ValueError(f"checkpoint {path} not found")
    if spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
        return ModelEntry(name, spec, hub_family(spec), 0)
    raise ValueError(f"model {spec!r} not found: not a folder, a .safetensors file or a hub id")


def scan(folder: Path, allow_pickle: bool = False) -> list[ModelEntry]:
    """Every diffusers folder and single-file checkpoint under `folder`, by relative name."""
    entries: list[ModelEntry] = []
    suffixes = SAFE_SUFFIXES + PICKLE_SUFFIXES
    pending = [folder] if folder.is_dir() else []
    # Symlinked folders are followed (an A1111 models folder linked in), each folder once.
    seen = {folder.resolve()}
    while pending:
        current = pending.pop()
        for path in sorted(current.iterdir()):
            relative = path.relative_to(folder)
            if path.name.startswith("."):
                continue
            if path.is_dir() and not (path / "model_index.json").is_file():
                if path.resolve() not in seen:
                    seen.add(path.resolve())
                    pending.append(path)
            elif path.is_dir() or path.suffix in suffixes:
                # Folder names may hold dots ("sd-2.1"); only files lose their suffix.
                name = (relative if path.is_dir() else relative.with_suffix("")).as_posix()
                try:
                    entries.append(describe(str(path), name, allow_pickle=allow_pickle))
                except Exception as exc:  # one broken file must not hide the rest of the folder
                    log.warning("skipping %s: %s", path, exc)
    return entries


def load_pipeline(
    entry: ModelEntry, dtype: torch.dtype, allow_pickle: bool = False
) -> DiffusionPipeline:
    """The text-to-image pipeline of an entry, from the auto pipeline of its family; pickle
    weights only if `allow_pickle` (checked again here: files change after they are listed)."""
    path = Path(entry.path)
    # None: safetensors where a component has them, else pickle; True: safetensors or an error.
    use_safetensors = None if allow_pickle else True
    if path.is_dir():
        if not allow_pickle:
            _refuse_pickle(path)
        return AutoPipelineForText2Image.from_pretrained(
            path, dtype=dtype, use_safetensors=use_safetensors
        )
    if path.is_file():
        if path.suffix not in SAFE_SUFFIXES and not allow_pickle:
            raise ModelRefused(
                "it is a pickle checkpoint, which can run code when loaded: "
                "--allow-pickle lets it in"
            )
        key = FAMILY_PIPELINE_KEY.get(entry.family, entry.family)
        pipeline_class = AUTO_TEXT2IMAGE_PIPELINES_MAPPING.get(key)
        if pipeline_class is None:
            raise ValueError(f"{path}: no text-to-image pipeline for the {entry.family} family")
        try:
            # Without `config` diffusers fetches the family's reference configs from the hub.
            return pipeline_class.from_single_file(path, dtype=dtype, config=entry.config)
        except OSError as exc:
            if entry.config is not None:
                raise
            raise OSError(
                f"{path}: a single-file checkpoint needs its model's diffusers config and none "
                f"could be fetched from the hub; pass --model-config FOLDER ({exc})"
            ) from exc
    try:
        return AutoPipelineForText2Image.from_pretrained(
            entry.path, dtype=dtype, use_safetensors=use_safetensors
        )
    except OSError as exc:
        offline = " (offline: HF_HUB_OFFLINE is set)" if hub_constants.HF_HUB_OFFLINE else ""
        raise OSError(
            f"model {entry.path!r} is no local folder or file, and as a hub id it could not be "
            f"found in the hub cache or downloaded{offline}: {exc}"
        ) from exc


class ModelRegistry:
    """The listed models by name: the operator's own (the embedded model, `--model`) first,
    then the models folder, rescanned on request so that new downloads appear without a restart.

    A rescan may run on any thread while others read: it builds the new listing aside and swaps
    it in with one assignment, so a reader sees the old listing or the new one, never a mix.
    """

    def __init__(
        self,
        fixed: list[ModelEntry],
        folder: Path | None = None,
        allow_pickle: bool = False,
        configs: Mapping[str, str] | None = None,
    ) -> None:
        self.fixed = fixed
        self.folder = folder
        self.allow_pickle = allow_pickle
        self.configs = dict(configs or {})
        # Orders rescans and `add`: a rescan that began before an `add` cannot publish after it.
        self._refreshing = threading.Lock()
        self._entries: dict[str, ModelEntry] = {}  # replaced whole, never changed in place
        self.refresh()

    def refresh(self) -> None:
        with self._refreshing:
            self._refresh()

    def _refresh(self) -> None:
        scanned = scan(self.folder, self.allow_pickle) if self.folder else []
        entries: dict[str, ModelEntry] = {}
        for entry in [*self.fixed, *scanned]:
            if entry.name in entries:
                kept = entries[entry.name].path
                log.warning("two models are named %r; serving %s", entry.name, kept)
                continue
            config = self.configs.get(entry.name)
            if config and entry.config is None:
                entry = dataclasses.replace(entry, config=config)
            entries[entry.name] = entry
        self._entries = entries

    def add(self, entry: ModelEntry) -> None:
        """List a model the operator named by path or hub id, ahead of the folder's; an entry
        of the same name is replaced (a hub model's family is known once it is downloaded)."""
        with self._refreshing:
            self.fixed = [fixed for fixed in self.fixed if fixed.name != entry.name] + [entry]
            self._refresh()

    def get(self, name: str) -> ModelEntry | None:
        return self._entries.get(name)

    def entries(self) -> list[ModelEntry]:
        return list(self._entries.values())

    def names(self) -> list[str]:
        return list(self._entries)
