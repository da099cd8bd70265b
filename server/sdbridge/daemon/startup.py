"""What `sdbridge serve` builds from its settings: the model and LoRA listings and the engine."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .. import tiny
from .cache import MemoryOptions, ModelCache
from .engine import Engine
from .loras import LoraRegistry
from .models import ModelRegistry, describe


def quiet_libraries() -> None:
    """No progress bars or info lines from diffusers and transformers in the daemon's log."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()  # per component, on every model switch


def tiny_present() -> bool:
    return (tiny.MODEL_DIR / "model_index.json").is_file()


def build_registry(settings: Any) -> ModelRegistry:
    """The listed models: the embedded one, then the models folder (`settings`: `Settings`)."""
    embedded = [describe(str(tiny.MODEL_DIR), tiny.NAME)] if tiny_present() else []
    configs = {
        name: str(Path(table["config"]).expanduser())
        for name, table in settings.models.items()
        if "config" in table
    }
    return ModelRegistry(embedded, settings.models_dir, settings.allow_pickle, configs=configs)


def build_engine(settings: Any, model: str) -> Engine:
    """The engine serving `model` first, on the device the settings name. Raises ValueError or
    OSError when the model cannot be loaded."""
    models = ModelCache(
        model,
        device=settings.device,
        dtype=settings.dtype,
        config=settings.model_config,
        registry=build_registry(settings),
        memory=MemoryOptions(settings.attention_slicing, settings.vae_tiling, settings.cpu_offload),
        max_loaded=settings.max_loaded_models,
        model_settings=settings.models,
        allow_pickle=settings.allow_pickle,
    )
    return Engine(models, LoraRegistry(settings.loras_dir))
