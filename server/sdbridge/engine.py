"""The engine: one warm diffusers pipeline serving txt2img, img2img and inpainting jobs.

All three modes share the same weights (`from_pipe`); each job gets its own scheduler and its own
seeded `torch.Generator`, so a job never sees another job's state and the same request with the
same seed gives the same pixels.
"""

from __future__ import annotations

import inspect
import io
import math
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import (
    AutoPipelineForImage2Image,
    AutoPipelineForInpainting,
    AutoPipelineForText2Image,
    DiffusionPipeline,
    StableDiffusionPipeline,
)
from PIL import Image, ImageFilter

from . import protocol
from .outputs import GenerationInfo
from .previews import LatentPreviewer
from .protocol import ErrorCode, GenerateRequest, ProtocolError

# The names AUTOMATIC1111 users know, for the PNG metadata.
SAMPLER_NAMES = {
    "EulerDiscreteScheduler": "Euler",
    "EulerAncestralDiscreteScheduler": "Euler a",
    "DPMSolverMultistepScheduler": "DPM++ 2M",
    "DDIMScheduler": "DDIM",
    "PNDMScheduler": "PLMS",
    "LMSDiscreteScheduler": "LMS",
    "UniPCMultistepScheduler": "UniPC",
    "DDPMScheduler": "DDPM",
    "LCMScheduler": "LCM",
    "HeunDiscreteScheduler": "Heun",
}

# Generate at least at the native size and at most at 1.5x its side (by area), keeping the aspect
# ratio: a small selection is not painted at 96x96, a huge canvas does not exhaust memory.
NATIVE_MAX_FACTOR = 1.5
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
    path = Path(spec)
    if path.exists():
        return path.stem if path.is_file() else path.resolve().name
    return spec


def load_pipeline(spec: str, dtype: torch.dtype, config: str | None = None) -> DiffusionPipeline:
    """Load a diffusers folder, a single-file `.safetensors` checkpoint or a hub id."""
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ValueError(f"{path} is not a diffusers model folder (no model_index.json)")
        return AutoPipelineForText2Image.from_pretrained(path, dtype=dtype)
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ValueError(f"{path}: only .safetensors checkpoints are loaded")
        # Without `config` diffusers fetches the reference config from the hub.
        return StableDiffusionPipeline.from_single_file(path, dtype=dtype, config=config)
    if spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
        return AutoPipelineForText2Image.from_pretrained(spec, dtype=dtype)
    raise ValueError(f"model {spec!r} not found: not a folder, a .safetensors file or a hub id")


def generation_size(width: int, height: int, native: int) -> tuple[int, int]:
    """A size near the model's native area with the target's aspect ratio, multiples of 8."""
    area = width * height
    low, high = native * native, (native * NATIVE_MAX_FACTOR) ** 2
    scale = math.sqrt(low / area) if area < low else math.sqrt(high / area) if area > high else 1.0
    return (max(8, round(width * scale / 8) * 8), max(8, round(height * scale / 8) * 8))


def feathered_mask(mask: Image.Image) -> Image.Image:
    """Soften the mask's edge inwards only: outside the mask stays exactly 0."""
    radius = max(1.0, FEATHER_FRACTION * min(mask.size))
    blurred = np.asarray(mask.filter(ImageFilter.GaussianBlur(radius)), dtype=np.uint16)
    hard = np.asarray(mask, dtype=np.uint16)
    return Image.fromarray((blurred * hard // 255).astype(np.uint8))


def decode_image(image: protocol.Image, mode: str) -> Image.Image:
    if image.format == "png":
        try:
            decoded = Image.open(io.BytesIO(image.data))
            decoded.load()
        except Exception as exc:
            raise ProtocolError(ErrorCode.BAD_IMAGE, f"PNG does not decode: {exc}") from exc
    else:
        decoded = Image.frombytes("RGBA", (image.width, image.height), image.data)
    if mode == "L":
        return decoded.getchannel(0) if decoded.mode != "L" else decoded
    if decoded.mode in ("RGBA", "LA", "P"):
        # Transparent canvas areas are painted as white paper, not as their hidden colour.
        decoded = decoded.convert("RGBA")
        paper = Image.new("RGBA", decoded.size, (255, 255, 255, 255))
        decoded = Image.alpha_composite(paper, decoded)
    return decoded.convert("RGB")


def _options(pipe: DiffusionPipeline) -> dict[str, object]:
    """The pipeline's non-component constructor arguments (e.g. `requires_safety_checker`)."""
    parameters = inspect.signature(type(pipe).__init__).parameters
    return {k: v for k, v in pipe.config.items() if k in parameters and k not in pipe.components}


class Engine:
    """Loads one model once and runs jobs on it, one at a time."""

    def __init__(
        self,
        model: str,
        device: str = "auto",
        dtype: str = "auto",
        config: str | None = None,
    ) -> None:
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.model = model_name(model)
        self.txt2img = load_pipeline(model, self.dtype, config).to(self.device)
        self.img2img = AutoPipelineForImage2Image.from_pipe(self.txt2img)
        self.inpaint = AutoPipelineForInpainting.from_pipe(self.txt2img)
        sample = self.txt2img.unet.config.sample_size
        sample = sample if isinstance(sample, int) else min(sample)
        self.native_size = sample * self.txt2img.vae_scale_factor
        self.previewer = LatentPreviewer.fit(self.txt2img.vae)

    @property
    def sampler(self) -> str:
        name = type(self.txt2img.scheduler).__name__
        return SAMPLER_NAMES.get(name, name)

    def _pipeline_for(self, request: GenerateRequest) -> DiffusionPipeline:
        """A pipeline over the shared weights with a scheduler of the job's own.

        Built directly rather than with `from_pipe`, which costs ~9 ms against ~1 ms here.
        """
        base = {"txt2img": self.txt2img, "img2img": self.img2img, "inpaint": self.inpaint}
        pipe = base[request.mode]
        scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
        job_pipe = type(pipe)(**{**pipe.components, "scheduler": scheduler}, **_options(pipe))
        job_pipe.set_progress_bar_config(disable=True)
        return job_pipe

    def run(
        self,
        request: GenerateRequest,
        on_progress: ProgressCallback,
        on_preview: PreviewCallback,
        should_cancel: Callable[[], bool],
    ) -> list[GeneratedImage]:
        width = request.width or (request.init_image.width if request.init_image else None)
        height = request.height or (request.init_image.height if request.init_image else None)
        width, height = width or self.native_size, height or self.native_size
        gen_width, gen_height = generation_size(width, height, self.native_size)
        seed = request.seed if request.seed is not None else secrets.randbelow(protocol.MAX_SEED)
        seeds = [seed + i for i in range(request.num_images)]
        generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]

        def on_step_end(pipe: DiffusionPipeline, step: int, timestep, tensors: dict) -> dict:
            if should_cancel():
                raise JobCancelled
            total = pipe.num_timesteps
            on_progress(step + 1, total)
            if request.preview_every and (step + 1) % request.preview_every == 0:
                w, h, data = self.previewer.to_rgba(tensors["latents"])
                on_preview(step + 1, total, protocol.Image(w, h, data))
            return {}

        arguments = dict(
            prompt=request.prompt,
            negative_prompt=request.negative_prompt or None,
            num_inference_steps=request.num_inference_steps,
            guidance_scale=request.guidance_scale,
            num_images_per_prompt=request.num_images,
            generator=generators,
            callback_on_step_end=on_step_end,
            callback_on_step_end_tensor_inputs=["latents"],
        )
        init = mask = None
        if request.init_image is not None:
            init = decode_image(request.init_image, "RGB").resize((width, height), Image.LANCZOS)
            # At least one denoising step must remain after strength trims the schedule.
            arguments["num_inference_steps"] = max(
                request.num_inference_steps, math.ceil(1 / request.strength)
            )
            arguments.update(image=init.resize((gen_width, gen_height)), strength=request.strength)
        if request.mask_image is not None:
            mask = decode_image(request.mask_image, "L").resize((width, height), Image.BILINEAR)
            arguments.update(mask_image=mask.resize((gen_width, gen_height), Image.BILINEAR))
        if request.mode != "img2img":
            arguments.update(width=gen_width, height=gen_height)

        pipe = self._pipeline_for(request)
        try:
            images = pipe(**arguments).images
        except torch.OutOfMemoryError as exc:
            raise ProtocolError(
                ErrorCode.OUT_OF_MEMORY,
                f"the {self.device.type} device ran out of memory at {gen_width}x{gen_height}; "
                "try a smaller size or fewer images",
            ) from exc

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
                steps=request.num_inference_steps,
                sampler=self.sampler,
                cfg_scale=request.guidance_scale,
                seed=image_seed,
                width=width,
                height=height,
                model=self.model,
                denoising_strength=request.strength if init is not None else None,
            )
            results.append(GeneratedImage(image, image_seed, info))
        return results
