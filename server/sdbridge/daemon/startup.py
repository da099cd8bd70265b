"""What `sdbridge serve` builds from its settings: the model and LoRA listings and the engine,
and for a cluster the environment Ray starts in.

One place for both kinds of daemon: the local one builds its engine here, and so does each worker
of a cluster (`cluster.py`) on its own device, from the same settings.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from .. import tiny
from .cache import MemoryOptions, ModelCache
from .controlnets import ControlNetRegistry, embedded_controlnets
from .engine import Engine
from .loras import LoraRegistry
from .models import ModelRegistry, describe

if TYPE_CHECKING:
    from .settings import Settings


def quiet_libraries() -> None:
    """No progress bars or info lines from diffusers and transformers in the daemon's log."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()  # per component, on every model switch


def build_registry(settings: Settings) -> ModelRegistry:
    """The listed models: the embedded one, then the models folder."""
    embedded = [describe(str(tiny.MODEL_DIR), tiny.NAME)] if tiny.is_present() else []
    configs = {
        name: str(Path(table["config"]).expanduser())
        for name, table in settings.models.items()
        if "config" in table
    }
    return ModelRegistry(embedded, settings.models_dir, settings.allow_pickle, configs=configs)


def build_engine(settings: Settings, model: str) -> Engine:
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
    return Engine(
        models,
        LoraRegistry(settings.loras_dir),
        ControlNetRegistry(settings.controlnets_dir, embedded_controlnets()),
    )


def ray_environment(address: str) -> None:
    """What Ray reads from the environment, set before `cluster.py` imports it (a variable the
    operator set wins)."""
    # Without this a Ray driver exits 60 s after losing the cluster's GCS; the daemon must
    # outlive its cluster and say so (Ray's own setting; here a week).
    os.environ.setdefault("RAY_gcs_rpc_server_reconnect_timeout_s", str(7 * 24 * 3600))
    # A Ray call after the daemon shut its Ray down (the cluster was gone) must fail, not start
    # a new local instance.
    os.environ.setdefault("RAY_ENABLE_AUTO_CONNECT", "0")
    if address == "local":
        # One machine: Ray listens on loopback only and sends no usage report.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
