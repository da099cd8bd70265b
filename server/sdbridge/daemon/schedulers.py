"""Samplers by the names AUTOMATIC1111 users know, mapped to diffusers schedulers.

One table serves three purposes: the names a request may ask for (`hello.schedulers`), building
a job's own scheduler from the model's scheduler config, and naming the scheduler a job used in
the PNG `parameters` metadata. A1111's older combined names are used ("DPM++ 2M Karras"), since
they are what image browsers and shared prompts carry.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DEISMultistepScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSDEScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LCMScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import is_scipy_available, is_torchsde_available


@dataclass(frozen=True)
class Sampler:
    name: str
    scheduler: type[SchedulerMixin]
    # Every option that tells this sampler apart from another one of the same class is set
    # explicitly, "off" states included: the model's own config may have it on.
    options: Mapping[str, Any] = field(default_factory=dict)


def _with_karras(
    name: str, scheduler: type[SchedulerMixin], **options: Any
) -> tuple[Sampler, Sampler]:
    return (
        Sampler(name, scheduler, {**options, "use_karras_sigmas": False}),
        Sampler(f"{name} Karras", scheduler, {**options, "use_karras_sigmas": True}),
    )


NO_KARRAS = {"use_karras_sigmas": False}
# "2M": second order, multistep; the SDE variant adds noise each step like A1111's.
DPM_2M = {"algorithm_type": "dpmsolver++", "solver_order": 2}
DPM_2M_SDE = {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}
SAMPLERS: dict[str, Sampler] = {
    sampler.name: sampler
    for sampler in (
        Sampler("Euler", EulerDiscreteScheduler, NO_KARRAS),
        Sampler("Euler a", EulerAncestralDiscreteScheduler),
        Sampler("Heun", HeunDiscreteScheduler, NO_KARRAS),
        *_with_karras("DPM2", KDPM2DiscreteScheduler),
        *_with_karras("DPM2 a", KDPM2AncestralDiscreteScheduler),
        *_with_karras("DPM++ 2M", DPMSolverMultistepScheduler, **DPM_2M),
        *_with_karras("DPM++ 2M SDE", DPMSolverMultistepScheduler, **DPM_2M_SDE),
        Sampler("UniPC", UniPCMultistepScheduler, NO_KARRAS),
        Sampler("DEIS", DEISMultistepScheduler, NO_KARRAS),
        Sampler("DDIM", DDIMScheduler),
        Sampler("PLMS", PNDMScheduler),
        Sampler("DDPM", DDPMScheduler),
        Sampler("LCM", LCMScheduler),
    )
}
# These need optional packages (scipy, torchsde); without them diffusers has placeholders.
if is_scipy_available():
    SAMPLERS["LMS"] = Sampler("LMS", LMSDiscreteScheduler)
if is_torchsde_available():
    SAMPLERS.update((s.name, s) for s in _with_karras("DPM++ SDE", DPMSolverSDEScheduler))
NAMES: list[str] = list(SAMPLERS)


def build_scheduler(name: str, model_config: Mapping[str, Any], **overrides: Any) -> SchedulerMixin:
    """The sampler `name` over the model's own noise schedule (betas, prediction type, ...)."""
    sampler = SAMPLERS[name]
    return sampler.scheduler.from_config(model_config, **{**sampler.options, **overrides})


def max_inference_steps(scheduler: SchedulerMixin) -> int:
    """The most steps `scheduler` can schedule: one per training timestep; LCM and TCD pick
    theirs from the `original_inference_steps` of their distillation schedule."""
    config = scheduler.config
    train = config.num_train_timesteps
    return min(train, config.get("original_inference_steps") or train)


def denoising_steps(steps: int, strength: float, limit: int) -> tuple[int, float, int]:
    """(num_inference_steps, strength) to give a pipeline asked for `steps` at `strength`, and
    how many steps then run; `limit` is the scheduler's `max_inference_steps`.

    diffusers runs the last int(num_inference_steps * strength) of num_inference_steps steps.
    At least one must run and at most `limit` can be scheduled: a low strength lengthens the
    schedule up to `limit`, and a strength below 1 / limit is raised to 1 / limit.
    """
    strength = max(strength, 1 / limit)
    total = min(max(steps, math.ceil(1 / strength)), limit)
    while int(total * strength) < 1:  # 1 / strength rounded below the exact quotient
        strength = math.nextafter(strength, math.inf)
    return total, strength, int(total * strength)


def sampler_name(scheduler: SchedulerMixin) -> str:
    """The A1111 name of a scheduler instance; its class name when no entry matches."""
    config = scheduler.config
    for sampler in SAMPLERS.values():
        if type(scheduler) is sampler.scheduler and all(
            config.get(key) == value for key, value in sampler.options.items()
        ):
            return sampler.name
    return type(scheduler).__name__
