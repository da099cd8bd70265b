"""The model cache: which models are resident, their pipelines, and what their jobs get.

A job may name any listed model: the cache loads it while queued jobs wait and keeps the most
recently used ones resident, unloading the least recently used beyond a configured count. A
resident model holds its txt2img, img2img and inpainting pipelines over one set of weights
(`from_pipe`), placed on the device with the memory options and acceleration applied once, and
its job defaults (`presets`).
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting, DiffusionPipeline

from ..wire.protocol import ErrorCode, ProtocolError
from .acceleration import accelerate, mode_from_env
from .models import (
    UNKNOWN,
    ModelEntry,
    ModelRefused,
    ModelRegistry,
    describe,
    load_pipeline,
    pipeline_family,
)
from .presets import JobDefaults, job_defaults
from .previews import LatentPreviewer
from .resolution import SizeRange, size_range

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ValueError("--device mps: MPS is not available")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    if name not in dtypes:
        raise ValueError(f"unknown dtype {name!r}; choose one of auto, {', '.join(dtypes)}")
    return dtypes[name]


def model_name(spec: str) -> str:
    """The name a model given by path or hub id is listed under."""
    path = Path(spec)
    if path.exists():
        return path.stem if path.is_file() else path.resolve().name
    return spec


def native_size(pipe: DiffusionPipeline) -> int:
    """The side the model was trained at: its sample size in latents times the VAE factor."""
    sample = getattr(pipe, "default_sample_size", None) or pipe.unet.config.sample_size
    sample = sample if isinstance(sample, int) else min(sample)
    return sample * pipe.vae_scale_factor


@dataclass(frozen=True)
class MemoryOptions:
    attention_slicing: bool = False  # ~10% slower, less peak memory in attention
    vae_tiling: bool = False  # decodes large images tile by tile
    cpu_offload: bool = False  # CUDA only: each component moves to the GPU while it runs


@dataclass(eq=False)
class LoadedModel:
    """A resident model: its three pipelines over one set of weights, and what its jobs get."""

    entry: ModelEntry
    txt2img: DiffusionPipeline
    img2img: DiffusionPipeline
    inpaint: DiffusionPipeline
    previewer: LatentPreviewer
    native_size: int
    sizes: SizeRange
    defaults: JobDefaults

    @property
    def family(self) -> str:
        return self.entry.family

    def pipeline(self, mode: str) -> DiffusionPipeline:
        """The pipeline of a request's mode: txt2img, img2img or inpaint."""
        return {"txt2img": self.txt2img, "img2img": self.img2img, "inpaint": self.inpaint}[mode]


class ModelCache:
    """The resident models, most recently used last; loads run on the daemon's worker, while
    the socket thread reads the listings."""

    def __init__(
        self,
        model: str,
        device: str = "auto",
        dtype: str = "auto",
        config: str | None = None,
        *,
        registry: ModelRegistry | None = None,
        memory: MemoryOptions | None = None,
        max_loaded: int = 1,
        model_settings: Mapping[str, Mapping[str, Any]] | None = None,
        allow_pickle: bool = False,
    ) -> None:
        """`model` is loaded first: a name in `registry`, or else a diffusers folder, a
        single-file checkpoint (`config`: a folder with its diffusers configs) or a hub id."""
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.registry = registry or ModelRegistry([])
        self.memory = memory or MemoryOptions()
        self.max_loaded = max(1, max_loaded)
        self.model_settings = dict(model_settings or {})
        self.allow_pickle = allow_pickle
        self._loaded: OrderedDict[str, LoadedModel] = OrderedDict()
        self.acceleration = mode_from_env()  # `off` unless $SDBRIDGE_ACCELERATE says otherwise
        # Guards `_loaded` between the worker (loading) and the socket thread (listing).
        self._lock = threading.Lock()
        # (name, native size) of the most recently used model, for hello and status: kept apart
        # from `_loaded`, which is briefly empty while a model replaces the only resident one.
        self._active: tuple[str, int] = ("", 0)
        if self.registry.get(model) is None:
            self.registry.add(describe(model, model_name(model), config, allow_pickle))
            model = model_name(model)
        self.activate(model)

    @property
    def model(self) -> str:
        """The most recently used model: the one a job without `model` gets."""
        return self._active[0]

    @property
    def native_size(self) -> int:
        return self._active[1]

    def loaded_names(self) -> list[str]:
        with self._lock:
            return list(self._loaded)

    def resident(self, name: str) -> LoadedModel | None:
        """The model `name` if it is loaded; it does not become the most recently used."""
        with self._lock:
            return self._loaded.get(name)

    def defaults(self, name: str) -> JobDefaults:
        """What a job on model `name` gets for the fields its request leaves out."""
        loaded = self.resident(name)
        if loaded is not None:
            return loaded.defaults
        entry = self.registry.get(name)
        scheduler = entry.scheduler if entry is not None else ""
        return job_defaults(name, scheduler, self.model_settings.get(name))

    def activate(self, name: str, on_loading: Callable[[str], None] | None = None) -> LoadedModel:
        """The model `name`, loaded if it is not resident (`on_loading` is told first, since
        loading takes seconds to minutes); it becomes the most recently used."""
        with self._lock:
            loaded = self._loaded.get(name)
            if loaded is not None:
                self._loaded.move_to_end(name)
                self._active = (name, loaded.native_size)
                return loaded
        entry = self.registry.get(name)
        if entry is None:
            raise ProtocolError(ErrorCode.UNKNOWN_MODEL, f"unknown model {name!r}", "model")
        if on_loading is not None:
            on_loading(name)
        start = time.perf_counter()
        first = not self._active[0]
        try:
            # Read from disk before anything is unloaded: a broken file leaves the resident
            # models serving. Only moving to the device comes after making room.
            pipe = load_pipeline(entry, self.dtype, self.allow_pickle)
            self._evict(keep=self.max_loaded - 1)
            loaded = self._prepare(entry, pipe)
        except Exception as exc:
            if first:
                raise  # the daemon cannot start without its first model
            # If it failed on the device, the next job reloads the previous model by name.
            log.warning("cannot load %s from %s: %s", name, entry.path, exc)
            # Other errors name files of the operator's machine: the client gets their kind.
            reason = str(exc) if isinstance(exc, ModelRefused) else type(exc).__name__
            raise ProtocolError(
                ErrorCode.MODEL_LOAD_FAILED,
                f"model {name!r} did not load: {reason} (the daemon's log has the details)",
                "model",
            ) from exc
        with self._lock:
            self._loaded[name] = loaded
            self._active = (name, loaded.native_size)
        log.info("loaded %s (%s) in %.1f s", name, loaded.family, time.perf_counter() - start)
        return loaded

    def _evict(self, keep: int) -> None:
        with self._lock:
            while len(self._loaded) > keep:
                name, _ = self._loaded.popitem(last=False)
                log.info("unloaded %s", name)
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _prepare(self, entry: ModelEntry, pipe: DiffusionPipeline) -> LoadedModel:
        if self.memory.cpu_offload and self.device.type == "cuda":
            pipe.enable_model_cpu_offload(device=self.device)
        else:
            pipe.to(self.device)
        if self.memory.attention_slicing:
            pipe.enable_attention_slicing()
        if self.memory.vae_tiling:
            pipe.vae.enable_tiling()
        accelerate(pipe, self.acceleration)
        if entry.family == UNKNOWN:  # a hub id that was not in the cache before loading
            entry = dataclasses.replace(entry, family=pipeline_family(pipe))
            self.registry.add(entry)
        native = native_size(pipe)
        settings = self.model_settings.get(entry.name)
        return LoadedModel(
            entry=entry,
            txt2img=pipe,
            img2img=AutoPipelineForImage2Image.from_pipe(pipe),
            inpaint=AutoPipelineForInpainting.from_pipe(pipe),
            previewer=LatentPreviewer.fit(pipe.vae),
            native_size=native,
            sizes=size_range(entry.family, native, entry.path),
            defaults=job_defaults(entry.name, type(pipe.scheduler).__name__, settings),
        )
