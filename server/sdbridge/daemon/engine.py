"""The engine: warm diffusers pipelines serving txt2img, img2img and inpainting jobs.

All three modes share the same weights (`from_pipe`); each job gets its own scheduler and its own
seeded `torch.Generator`, so a job never sees another job's state and the same request with the
same seed gives the same pixels. A job may name any listed model: the engine loads it while
queued jobs wait and keeps the most recently used ones resident, unloading the least recently
used beyond a configured count.
"""

from __future__ import annotations

import dataclasses
import gc
import inspect
import logging
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting, DiffusionPipeline
from PIL import Image, ImageFilter

from ..wire import protocol
from ..wire.protocol import ErrorCode, GenerateRequest, ProtocolError
from . import loras as lora_loading
from .acceleration import accelerate, mode_from_env
from .images import decode_image
from .loras import LoraEntry, LoraRegistry
from .models import (
    UNKNOWN,
    ModelEntry,
    ModelRefused,
    ModelRegistry,
    describe,
    load_pipeline,
    pipeline_family,
)
from .parameters import GenerationInfo
from .presets import PRESETS, JobDefaults, job_defaults, lora_preset
from .previews import LatentPreviewer
from .resolution import SizeRange, refine_size, size_range
from .schedulers import (
    SAMPLERS,
    build_scheduler,
    denoising_steps,
    max_inference_steps,
    sampler_name,
)

log = logging.getLogger(__name__)

SEEDS = protocol.MAX_SEED + 1  # seeds are 0 .. MAX_SEED
# Inward feather of the inpainting mask, as a fraction of the mask's shorter side.
FEATHER_FRACTION = 0.02


class JobCancelled(Exception):
    """Raised from the step callback: stops the denoising loop without decoding."""


ProgressCallback = Callable[[int, int], None]
PreviewCallback = Callable[[int, int, protocol.Image], None]


@dataclass(frozen=True)
class GeneratedImage:
    image: Image.Image  # RGB at the requested size
    seed: int
    info: GenerationInfo


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


def feathered_mask(mask: Image.Image) -> Image.Image:
    """Soften the mask's edge inwards only: outside the mask stays exactly 0."""
    radius = max(1.0, FEATHER_FRACTION * min(mask.size))
    blurred = np.asarray(mask.filter(ImageFilter.GaussianBlur(radius)), dtype=np.uint16)
    hard = np.asarray(mask, dtype=np.uint16)
    return Image.fromarray((blurred * hard // 255).astype(np.uint8))


def _options(pipe: DiffusionPipeline) -> dict[str, object]:
    """The pipeline's non-component constructor arguments (e.g. `requires_safety_checker`)."""
    parameters = inspect.signature(type(pipe).__init__).parameters
    return {k: v for k, v in pipe.config.items() if k in parameters and k not in pipe.components}


def _generators(seeds: list[int]) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(seed) for seed in seeds]


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


@dataclass(frozen=True)
class JobPlan:
    """A request resolved against its model: every field the request left out is filled."""

    steps: int
    guidance_scale: float
    sampler: str | None
    timestep_spacing: str | None


class Engine:
    """Loads models on demand and runs jobs on them, one at a time (on the daemon's worker)."""

    def __init__(
        self,
        model: str,
        device: str = "auto",
        dtype: str = "auto",
        config: str | None = None,
        *,
        registry: ModelRegistry | None = None,
        loras: LoraRegistry | None = None,
        memory: MemoryOptions | None = None,
        max_loaded: int = 1,
        model_settings: Mapping[str, Mapping[str, Any]] | None = None,
        allow_pickle: bool = False,
    ) -> None:
        """`model` is served first: a name in `registry`, or else a diffusers folder, a
        single-file checkpoint (`config`: a folder with its diffusers configs) or a hub id."""
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.registry = registry or ModelRegistry([])
        self.loras = loras or LoraRegistry(None)
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

    # --- models --------------------------------------------------------------------------------

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

    def defaults(self, name: str) -> JobDefaults:
        """What a job on model `name` gets for the fields its request leaves out."""
        with self._lock:
            loaded = self._loaded.get(name)
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
            sizes=size_range(entry.family, native),
            defaults=job_defaults(entry.name, type(pipe.scheduler).__name__, settings),
        )

    # --- jobs ----------------------------------------------------------------------------------

    def rescan(self) -> None:
        """Rescan the models and LoRA folders: new downloads become listed, removed files not.
        Safe on any thread while jobs run and others read the listings."""
        self.registry.refresh()
        self.loras.refresh()

    def check(self, request: GenerateRequest, max_pixels: int | None = None) -> None:
        """Refuse names that no listed model, scheduler or LoRA has, before the job is queued,
        and a result over `max_pixels` at a resident model's native size (`run` checks it for
        the model it gets). A lookup in the current listings only: it never rescans (`rescan`
        does)."""
        if request.model is not None and self.registry.get(request.model) is None:
            raise ProtocolError(
                ErrorCode.UNKNOWN_MODEL,
                f"unknown model {request.model!r}; the models op lists them",
                "model",
            )
        if request.scheduler is not None and request.scheduler not in SAMPLERS:
            raise ProtocolError(
                ErrorCode.UNKNOWN_SCHEDULER,
                f"unknown scheduler {request.scheduler!r}; choose one of {', '.join(SAMPLERS)}",
                "scheduler",
            )
        missing = [lora.name for lora in request.loras if self.loras.get(lora.name) is None]
        if missing:
            raise ProtocolError(
                ErrorCode.UNKNOWN_LORA,
                f"unknown lora {missing[0]!r}; the models op lists them",
                "loras",
            )
        if max_pixels is not None:
            with self._lock:
                resident = self._loaded.get(request.model or self.model)
            if resident is not None:
                request.check_size(max_pixels, resident.native_size)

    def plan(self, request: GenerateRequest, defaults: JobDefaults) -> JobPlan:
        preset = lora_preset([lora.name for lora in request.loras])
        if preset is not None and defaults == PRESETS["standard"]:
            defaults = PRESETS[preset]
        return JobPlan(
            steps=request.num_inference_steps or defaults.num_inference_steps,
            guidance_scale=(
                defaults.guidance_scale
                if request.guidance_scale is None
                else request.guidance_scale
            ),
            sampler=request.scheduler or defaults.scheduler,
            timestep_spacing=defaults.timestep_spacing,
        )

    def _lora_entries(self, request: GenerateRequest) -> list[tuple[LoraEntry, float]]:
        entries = []
        for lora in request.loras:
            entry = self.loras.get(lora.name)
            if entry is None:  # removed from the folder while the job was queued
                raise ProtocolError(ErrorCode.UNKNOWN_LORA, f"lora {lora.name!r} is gone", "loras")
            entries.append((entry, lora.weight))
        return entries

    def _pipeline_for(self, model: LoadedModel, mode: str, plan: JobPlan) -> DiffusionPipeline:
        """A pipeline over the shared weights with a scheduler of the job's own.

        Built directly rather than with `from_pipe`, which costs ~9 ms against ~1 ms here.
        """
        pipe = {"txt2img": model.txt2img, "img2img": model.img2img, "inpaint": model.inpaint}[mode]
        config = pipe.scheduler.config
        spacing = {"timestep_spacing": plan.timestep_spacing} if plan.timestep_spacing else {}
        if plan.sampler is None:
            scheduler = type(pipe.scheduler).from_config(config, **spacing)
        else:
            scheduler = build_scheduler(plan.sampler, config, **spacing)
        job_pipe = type(pipe)(**{**pipe.components, "scheduler": scheduler}, **_options(pipe))
        job_pipe.set_progress_bar_config(disable=True)
        return job_pipe

    def run(
        self,
        request: GenerateRequest,
        on_progress: ProgressCallback,
        on_preview: PreviewCallback,
        should_cancel: Callable[[], bool],
        on_loading: Callable[[str], None] | None = None,
        max_pixels: int | None = None,
    ) -> list[GeneratedImage]:
        """`max_pixels`: the daemon's limit on the result's size (None: none)."""
        model = self.activate(request.model or self.model, on_loading)
        if max_pixels is not None:  # the model may differ from the one `check` saw
            request.check_size(max_pixels, model.native_size)
        plan = self.plan(request, model.defaults)
        width, height = request.output_size(model.native_size)
        if request.exact_size:  # only the VAE's factor remains a constraint
            first = dataclasses.replace(model.sizes, multiple=8).round(width, height)
        else:
            first = model.sizes.fit(width, height)
        second = (
            refine_size(first, (width, height), model.sizes) if request.refine_strength else None
        )
        seed = request.seed if request.seed is not None else secrets.randbelow(SEEDS)
        # Consecutive seeds wrap around: every seed a result reports can be asked for again.
        seeds = [(seed + i) % SEEDS for i in range(request.num_images)]
        loras = self._lora_entries(request)
        pipe = self._pipeline_for(model, request.mode, plan)
        # Every schedule is bounded by what the scheduler can hold, whatever the request says.
        limit = max_inference_steps(pipe.scheduler)
        steps, strength, _ = denoising_steps(plan.steps, request.strength, limit)
        refine_steps, refine_strength, refine_run = (
            denoising_steps(plan.steps, request.refine_strength, limit) if second else (0, 0.0, 0)
        )
        # Progress counts on across both passes; the second's length is known once it starts.
        done = 0

        def on_step_end(pipe: DiffusionPipeline, step: int, timestep, tensors: dict) -> dict:
            if should_cancel():
                raise JobCancelled
            total = done + pipe.num_timesteps + (0 if done else refine_run)
            on_progress(done + step + 1, total)
            if request.preview_every and (step + 1) % request.preview_every == 0:
                w, h, data = model.previewer.to_rgba(tensors["latents"])
                on_preview(done + step + 1, total, protocol.Image(w, h, data))
            return {}

        common = dict(
            guidance_scale=plan.guidance_scale,
            callback_on_step_end=on_step_end,
            callback_on_step_end_tensor_inputs=["latents"],
        )
        first_pass = dict(
            common,
            prompt=request.prompt,
            negative_prompt=request.negative_prompt or None,
            num_inference_steps=steps,
            num_images_per_prompt=request.num_images,
            generator=_generators(seeds),
        )
        init = mask = None
        if request.init_image is not None:
            init = decode_image(request.init_image, "RGB").resize((width, height), Image.LANCZOS)
            first_pass.update(image=init.resize(first), strength=strength)
        if request.mask_image is not None:
            mask = decode_image(request.mask_image, "L").resize((width, height), Image.BILINEAR)
            first_pass.update(mask_image=mask.resize(first, Image.BILINEAR))
        if request.mode != "img2img":
            first_pass.update(width=first[0], height=first[1])

        try:
            with lora_loading.applied(pipe, loras):
                images = pipe(**first_pass).images
                if second is not None:
                    done = pipe.num_timesteps
                    count = len(images)
                    images = self._pipeline_for(model, "img2img", plan)(
                        **common,
                        prompt=[request.prompt] * count,
                        negative_prompt=[request.negative_prompt] * count
                        if request.negative_prompt
                        else None,
                        num_inference_steps=refine_steps,
                        generator=_generators(seeds),
                        image=[image.resize(second, Image.LANCZOS) for image in images],
                        strength=refine_strength,
                    ).images
        except torch.OutOfMemoryError as exc:
            size = second or first
            raise ProtocolError(
                ErrorCode.OUT_OF_MEMORY,
                f"the {self.device.type} device ran out of memory at {size[0]}x{size[1]}; "
                "try a smaller size or fewer images",
            ) from exc

        sampler = sampler_name(pipe.scheduler)
        results = []
        for image, image_seed in zip(images, seeds, strict=True):
            if image.size != (width, height):
                image = image.resize((width, height), Image.LANCZOS)
            if init is not None and mask is not None:
                # Composite the original back so nothing outside the mask shifts colour.
                image = Image.composite(image, init, feathered_mask(mask))
            info = GenerationInfo(
                prompt=request.prompt,
                negative_prompt=request.negative_prompt,
                steps=min(plan.steps, limit),
                sampler=sampler,
                cfg_scale=plan.guidance_scale,
                seed=image_seed,
                width=width,
                height=height,
                model=model.entry.name,
                # As A1111 writes it: img2img's strength, else the second pass's.
                denoising_strength=(
                    strength if init is not None else refine_strength if second else None
                ),
                loras=tuple((lora.name, lora.weight) for lora in request.loras),
                hires_upscale=second[0] / first[0] if second else None,
            )
            results.append(GeneratedImage(image, image_seed, info))
        return results
