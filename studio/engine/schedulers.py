"""Schedulers by the names users know (A1111 sampler labels in PNG info)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from studio.errors import ConfigError

SchedulerName = Literal["ddim", "euler", "euler_a", "dpm++", "dpm++_karras", "dpm++_sde", "pndm", "lms", "heun", "unipc", "ddpm"]


@dataclass(frozen=True)
class SchedulerChoice:
    """A diffusers scheduler class, the options it is built with, and its A1111 label."""

    class_name: str
    label: str
    options: dict[str, Any] = field(default_factory=dict)


SCHEDULERS: dict[str, SchedulerChoice] = {
    "ddim": SchedulerChoice("DDIMScheduler", "DDIM"),
    "euler": SchedulerChoice("EulerDiscreteScheduler", "Euler"),
    "euler_a": SchedulerChoice("EulerAncestralDiscreteScheduler", "Euler a"),
    "dpm++": SchedulerChoice("DPMSolverMultistepScheduler", "DPM++ 2M"),
    "dpm++_karras": SchedulerChoice("DPMSolverMultistepScheduler", "DPM++ 2M Karras", {"use_karras_sigmas": True}),
    "dpm++_sde": SchedulerChoice("DPMSolverMultistepScheduler", "DPM++ 2M SDE", {"algorithm_type": "sde-dpmsolver++"}),
    "pndm": SchedulerChoice("PNDMScheduler", "PLMS", {"skip_prk_steps": True}),
    "lms": SchedulerChoice("LMSDiscreteScheduler", "LMS"),
    "heun": SchedulerChoice("HeunDiscreteScheduler", "Heun"),
    "unipc": SchedulerChoice("UniPCMultistepScheduler", "UniPC"),
    "ddpm": SchedulerChoice("DDPMScheduler", "DDPM"),
}
ALIASES = {"euler_ancestral": "euler_a", "dpmpp": "dpm++", "dpm++_2m": "dpm++", "plms": "pndm", "dpm": "dpm++"}


def scheduler_choice(name: str) -> SchedulerChoice:
    """Look a scheduler up by name, alias or A1111 label (case-insensitive)."""
    key = name.strip().lower().replace(" ", "_").replace("-", "_")
    key = ALIASES.get(key, key)
    if key in SCHEDULERS:
        return SCHEDULERS[key]
    for choice in SCHEDULERS.values():
        if choice.label.lower() == name.strip().lower():
            return choice
    raise ConfigError(f"scheduler {name!r} is not known; choose one of {', '.join(SCHEDULERS)}")


def build_scheduler(name: str | None, original) -> Any:
    """A fresh scheduler: ``name``'s class from the pipeline's own config, or the original's class."""
    import diffusers

    if name is None:
        return type(original).from_config(original.config)
    choice = scheduler_choice(name)
    cls = getattr(diffusers, choice.class_name)
    return cls.from_config(original.config, **choice.options)


def label_of_scheduler(name: str | None, original) -> str:
    """The A1111 label of a scheduler name, or of the pipeline's own scheduler class."""
    if name is not None:
        return scheduler_choice(name).label
    for choice in SCHEDULERS.values():
        if choice.class_name == type(original).__name__ and not choice.options:
            return choice.label
    return type(original).__name__
