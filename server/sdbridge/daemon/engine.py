"""The job runner: one request on one resident model, read top to bottom like a pipeline.

A job runs in three stages. First its request is resolved against the model (`plan_job`):
settings the request left out, sizes and seeds are fixed before any pixel. Then the passes run:
txt2img, img2img or inpainting, and for a large target a second img2img pass (A1111's "hires
fix"). Last each image gets its metadata. The models themselves come from `cache.ModelCache`.

All three modes share the model's weights; each job gets its own scheduler and its own seeded
`torch.Generator`, so a job never sees another job's state and the same request with the same
seed gives the same pixels.
"""

from __future__ import annotations

import dataclasses
import inspect
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from diffusers import (
    AutoPipelineForImage2Image,
    AutoPipelineForInpainting,
    AutoPipelineForText2Image,
    ControlNetModel,
    DiffusionPipeline,
)
from PIL import Image, ImageFilter

from ..wire import protocol
from ..wire.protocol import ErrorCode, GenerateRequest, ProtocolError
from . import loras as lora_loading
from .cache import LoadedModel, ModelCache
from .controlnets import ControlNetCache, ControlNetRegistry, steered_by
from .images import decode_image
from .loras import LoraEntry, LoraRegistry
from .parameters import GenerationInfo
from .preprocessors import PREPROCESSORS
from .presets import PRESETS, lora_preset
from .previews import LatentPreviewer
from .resolution import refine_size
from .schedulers import (
    SAMPLERS,
    build_scheduler,
    denoising_steps,
    max_inference_steps,
    sampler_name,
)

# The auto pipeline whose `from_pipe` gives a mode's pipeline its ControlNet variant.
AUTO_PIPELINES = {
    "txt2img": AutoPipelineForText2Image,
    "img2img": AutoPipelineForImage2Image,
    "inpaint": AutoPipelineForInpainting,
}
SEEDS = protocol.MAX_SEED + 1  # seeds are 0 .. MAX_SEED
# Inward feather of the inpainting mask, as a fraction of the mask's shorter side.
FEATHER_FRACTION = 0.02

Size = tuple[int, int]


class JobCancelled(Exception):
    """Raised from the step callback: stops the denoising loop without decoding."""


ProgressCallback = Callable[[int, int], None]
PreviewCallback = Callable[[int, int, protocol.Image], None]


@dataclass(frozen=True)
class GeneratedImage:
    image: Image.Image  # RGB at the requested size
    seed: int
    info: GenerationInfo


@dataclass(frozen=True)
class JobPlan:
    """A request resolved against its model before any pass runs: every field the request left
    out is filled, and the sizes and seeds are fixed."""

    steps: int
    guidance_scale: float
    sampler: str | None  # None: the model's own scheduler
    timestep_spacing: str | None
    size: Size  # the result's
    first: Size  # the first pass's
    second: Size | None  # the second pass's; None: no second pass
    seeds: tuple[int, ...]  # one per image


def batch_seeds(seed: int, count: int) -> tuple[int, ...]:
    """Image i of a batch gets `seed + i`, wrapping around: every seed a result reports can be
    asked for again."""
    return tuple((seed + i) % SEEDS for i in range(count))


def plan_job(request: GenerateRequest, model: LoadedModel) -> JobPlan:
    defaults = model.defaults
    preset = lora_preset([lora.name for lora in request.loras])
    if preset is not None and defaults == PRESETS["standard"]:
        defaults = PRESETS[preset]
    size = request.output_size(model.native_size)
    if request.exact_size:  # only the VAE's factor remains a constraint
        first = dataclasses.replace(model.sizes, multiple=8).round(*size)
    else:
        first = model.sizes.fit(*size)
    seed = request.seed if request.seed is not None else secrets.randbelow(SEEDS)
    return JobPlan(
        steps=request.num_inference_steps or defaults.num_inference_steps,
        guidance_scale=(
            defaults.guidance_scale if request.guidance_scale is None else request.guidance_scale
        ),
        sampler=request.scheduler or defaults.scheduler,
        timestep_spacing=defaults.timestep_spacing,
        size=size,
        first=first,
        second=refine_size(first, size, model.sizes) if request.refine_strength else None,
        seeds=batch_seeds(seed, request.num_images),
    )


def job_pipeline(pipe: DiffusionPipeline, plan: JobPlan) -> DiffusionPipeline:
    """A pipeline over `pipe`'s components with a scheduler of the job's own.

    Built directly rather than with `from_pipe`, which costs ~9 ms against ~1 ms here.
    """
    config = pipe.scheduler.config
    spacing = {"timestep_spacing": plan.timestep_spacing} if plan.timestep_spacing else {}
    if plan.sampler is None:
        scheduler = type(pipe.scheduler).from_config(config, **spacing)
    else:
        scheduler = build_scheduler(plan.sampler, config, **spacing)
    job_pipe = type(pipe)(**{**pipe.components, "scheduler": scheduler}, **_options(pipe))
    job_pipe.set_progress_bar_config(disable=True)
    return job_pipe


def _options(pipe: DiffusionPipeline) -> dict[str, object]:
    """The pipeline's non-component constructor arguments (e.g. `requires_safety_checker`)."""
    parameters = inspect.signature(type(pipe).__init__).parameters
    return {k: v for k, v in pipe.config.items() if k in parameters and k not in pipe.components}


def _generators(seeds: tuple[int, ...]) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(seed) for seed in seeds]


def feathered_mask(mask: Image.Image) -> Image.Image:
    """Soften the mask's edge inwards only: outside the mask stays exactly 0."""
    radius = max(1.0, FEATHER_FRACTION * min(mask.size))
    blurred = np.asarray(mask.filter(ImageFilter.GaussianBlur(radius)), dtype=np.uint16)
    hard = np.asarray(mask, dtype=np.uint16)
    return Image.fromarray((blurred * hard // 255).astype(np.uint8))


def control_arguments(request: GenerateRequest, size: Size, image_argument: str) -> dict[str, Any]:
    """The ControlNet pipeline's arguments for the request's `control` entries at the pass's
    size: one ControlNet takes numbers, several take lists."""
    images = [
        PREPROCESSORS[c.preprocessor](
            decode_image(c.image, "RGBA", "control").resize(size, Image.BILINEAR)
        )
        for c in request.control
    ]
    values = {
        image_argument: images,
        "controlnet_conditioning_scale": [c.strength for c in request.control],
        "control_guidance_start": [c.start for c in request.control],
        "control_guidance_end": [c.end for c in request.control],
    }
    if len(images) == 1:
        return {key: value[0] for key, value in values.items()}
    return values


class StepCallback:
    """`callback_on_step_end` for both passes: progress counts on across them, previews every
    `preview_every` steps, and a cancelled job stops at the next step."""

    def __init__(
        self,
        on_progress: ProgressCallback,
        on_preview: PreviewCallback,
        should_cancel: Callable[[], bool],
        previewer: LatentPreviewer,
        preview_every: int,
        second_pass_steps: int,
    ) -> None:
        self.on_progress = on_progress
        self.on_preview = on_preview
        self.should_cancel = should_cancel
        self.previewer = previewer
        self.preview_every = preview_every
        self.second_pass_steps = second_pass_steps
        self.done = 0  # steps of the first pass, once the second runs

    def __call__(
        self, pipe: DiffusionPipeline, step: int, timestep: Any, tensors: Mapping[str, Any]
    ) -> dict[str, Any]:
        if self.should_cancel():
            raise JobCancelled
        # The second pass's length is known once it starts: until then, the planned one.
        total = self.done + pipe.num_timesteps + (0 if self.done else self.second_pass_steps)
        self.on_progress(self.done + step + 1, total)
        if self.preview_every and (step + 1) % self.preview_every == 0:
            w, h, data = self.previewer.to_rgba(tensors["latents"])
            self.on_preview(self.done + step + 1, total, protocol.Image(w, h, data))
        return {}


class Engine:
    """Runs jobs, one at a time (on the daemon's worker), on the models of its `ModelCache`."""

    def __init__(
        self,
        models: ModelCache,
        loras: LoraRegistry | None = None,
        controlnets: ControlNetRegistry | None = None,
    ) -> None:
        self.models = models
        self.loras = loras or LoraRegistry(None)
        self.controlnets = controlnets or ControlNetRegistry(None)
        self.device = models.device
        self.dtype = models.dtype
        self.loaded_controlnets = ControlNetCache(self.device, self.dtype)

    @property
    def model(self) -> str:
        """The most recently used model: the one a job without `model` gets."""
        return self.models.model

    @property
    def native_size(self) -> int:
        return self.models.native_size

    def activate(self, name: str, on_loading: Callable[[str], None] | None = None) -> LoadedModel:
        """The model `name`, loaded if need be: `ModelCache.activate`."""
        return self.models.activate(name, on_loading)

    def rescan(self) -> None:
        """Rescan the models, LoRA and ControlNet folders: new downloads become listed, removed
        files not. Safe on any thread while jobs run and others read the listings."""
        self.models.registry.refresh()
        self.loras.refresh()
        self.controlnets.refresh()

    def check(self, request: GenerateRequest, max_pixels: int | None = None) -> None:
        """Refuse names that no listed model, scheduler, LoRA or ControlNet has, before the job
        is queued, and a result over `max_pixels` at a resident model's native size (`run`
        checks it for the model it gets). A lookup in the current listings only: it never
        rescans (`rescan` does)."""
        if request.model is not None and self.models.registry.get(request.model) is None:
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
        named = (
            (ErrorCode.UNKNOWN_LORA, "lora", "loras", self.loras, [x.name for x in request.loras]),
            (
                ErrorCode.UNKNOWN_CONTROLNET,
                "ControlNet",
                "control",
                self.controlnets,
                [x.model for x in request.control if x.model is not None],
            ),
        )
        for code, kind, field, listing, names in named:
            missing = [name for name in names if listing.get(name) is None]
            if missing:
                raise ProtocolError(
                    code, f"unknown {kind} {missing[0]!r}; the models op lists them", field
                )
        if max_pixels is not None:
            resident = self.models.resident(request.model or self.model)
            if resident is not None:
                request.check_size(max_pixels, resident.native_size)

    def _lora_entries(self, request: GenerateRequest) -> list[tuple[LoraEntry, float]]:
        entries = []
        for lora in request.loras:
            entry = self.loras.get(lora.name)
            if entry is None:  # removed from the folder while the job was queued
                raise ProtocolError(ErrorCode.UNKNOWN_LORA, f"lora {lora.name!r} is gone", "loras")
            entries.append((entry, lora.weight))
        return entries

    def _controlnets(
        self, request: GenerateRequest, model: LoadedModel
    ) -> list[tuple[str, ControlNetModel]]:
        """Each control entry's ControlNet, by name: the one it names, else the first listed
        that fits the model."""
        unet = getattr(model.txt2img, "unet", None)
        if request.control and unet is None:  # a transformer model (SD 3, Flux)
            raise ProtocolError(
                ErrorCode.CONTROLNET_LOAD_FAILED,
                f"model {model.entry.name!r} ({model.family}) has no UNet for a ControlNet here",
                "control",
            )
        nets = []
        for control in request.control:
            if control.model is None:
                entry = self.controlnets.fitting(unet)
                if entry is None:
                    family, width = steered_by(unet)
                    raise ProtocolError(
                        ErrorCode.UNKNOWN_CONTROLNET,
                        f"no listed ControlNet fits model {model.entry.name!r} ({family}, "
                        f"context width {width}): put one in the controlnets folder",
                        "control",
                    )
            else:
                entry = self.controlnets.get(control.model)
            if entry is None:  # removed from the folder while the job was queued
                raise ProtocolError(
                    ErrorCode.UNKNOWN_CONTROLNET, f"ControlNet {control.model!r} is gone", "control"
                )
            nets.append((entry.name, self.loaded_controlnets.get(entry, unet, model.entry.name)))
        return nets

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
        # 1. The model, and the request resolved against it.
        model = self.models.activate(request.model or self.model, on_loading)
        if max_pixels is not None:  # the model may differ from the one `check` saw
            request.check_size(max_pixels, model.native_size)
        plan = plan_job(request, model)
        loras = self._lora_entries(request)
        named = self._controlnets(request, model)
        nets = [net for _, net in named]
        pipe = job_pipeline(model.pipeline(request.mode), plan)
        if nets:  # the mode's ControlNet pipeline over the same components and scheduler
            try:
                pipe = AUTO_PIPELINES[request.mode].from_pipe(
                    pipe, controlnet=nets[0] if len(nets) == 1 else nets
                )
            except ValueError as exc:  # diffusers has no ControlNet variant of this pipeline
                raise ProtocolError(
                    ErrorCode.CONTROLNET_LOAD_FAILED,
                    f"model {model.entry.name!r} ({model.family}) has no ControlNet pipeline "
                    f"for {request.mode}",
                    "control",
                ) from exc
            pipe.set_progress_bar_config(disable=True)
        # Every schedule is bounded by what the scheduler can hold, whatever the request says.
        limit = max_inference_steps(pipe.scheduler)
        steps, strength, _ = denoising_steps(plan.steps, request.strength, limit)
        refine_steps, refine_strength, refine_run = (
            denoising_steps(plan.steps, request.refine_strength, limit)
            if plan.second
            else (0, 0.0, 0)
        )
        init = mask = None
        if request.init_image is not None:
            init = decode_image(request.init_image, "RGB").resize(plan.size, Image.LANCZOS)
        if request.mask_image is not None:
            mask = decode_image(request.mask_image, "L").resize(plan.size, Image.BILINEAR)

        # 2. The passes.
        callback = StepCallback(
            on_progress,
            on_preview,
            should_cancel,
            model.previewer,
            request.preview_every,
            refine_run,
        )
        common = dict(
            guidance_scale=plan.guidance_scale,
            callback_on_step_end=callback,
            callback_on_step_end_tensor_inputs=["latents"],
        )
        first_pass = dict(
            common,
            prompt=request.prompt,
            negative_prompt=request.negative_prompt or None,
            num_inference_steps=steps,
            num_images_per_prompt=request.num_images,
            generator=_generators(plan.seeds),
        )
        if init is not None:
            first_pass.update(image=init.resize(plan.first), strength=strength)
        if mask is not None:
            first_pass.update(mask_image=mask.resize(plan.first, Image.BILINEAR))
        if request.mode != "img2img":
            first_pass.update(width=plan.first[0], height=plan.first[1])
        if nets:
            first_pass.update(
                control_arguments(request, plan.first, "image" if init is None else "control_image")
            )
        try:
            with lora_loading.applied(pipe, loras):
                images = pipe(**first_pass).images
                if plan.second is not None:
                    callback.done = pipe.num_timesteps
                    count = len(images)
                    images = job_pipeline(model.img2img, plan)(
                        **common,
                        prompt=[request.prompt] * count,
                        negative_prompt=[request.negative_prompt] * count
                        if request.negative_prompt
                        else None,
                        num_inference_steps=refine_steps,
                        generator=_generators(plan.seeds),
                        image=[image.resize(plan.second, Image.LANCZOS) for image in images],
                        strength=refine_strength,
                    ).images
        except torch.OutOfMemoryError as exc:
            size = plan.second or plan.first
            raise ProtocolError(
                ErrorCode.OUT_OF_MEMORY,
                f"the {self.device.type} device ran out of memory at {size[0]}x{size[1]}; "
                "try a smaller size or fewer images",
            ) from exc

        # 3. The images at the requested size, with their metadata.
        sampler = sampler_name(pipe.scheduler)
        results = []
        for image, image_seed in zip(images, plan.seeds, strict=True):
            if image.size != plan.size:
                image = image.resize(plan.size, Image.LANCZOS)
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
                width=plan.size[0],
                height=plan.size[1],
                model=model.entry.name,
                # As A1111 writes it: img2img's strength, else the second pass's.
                denoising_strength=(
                    strength if init is not None else refine_strength if plan.second else None
                ),
                loras=tuple((lora.name, lora.weight) for lora in request.loras),
                hires_upscale=plan.second[0] / plan.first[0] if plan.second else None,
                controls=tuple(
                    (c.preprocessor, name, c.strength, c.start, c.end)
                    for c, (name, _) in zip(request.control, named, strict=True)
                ),
            )
            results.append(GeneratedImage(image, image_seed, info))
        return results
