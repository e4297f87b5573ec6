"""Schedulers by the names users know (A1111 sampler labels in PNG info).

Flow-matching bases (FLUX.1, SD3) sample with their own FlowMatchEulerDiscreteScheduler: the
epsilon / v schedulers of the SD family would read a flow-matching config as a noise schedule
and make noise, so on those bases only ``euler`` (the flow-matching Euler) is offered and any
other name is refused (``flow=True``).
"""

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
FLOW_SCHEDULERS: dict[str, SchedulerChoice] = {"euler": SchedulerChoice("FlowMatchEulerDiscreteScheduler", "Euler")}
ALIASES = {"euler_ancestral": "euler_a", "dpmpp": "dpm++", "dpm++_2m": "dpm++", "plms": "pndm", "dpm": "dpm++"}


def scheduler_choice(name: str, flow: bool = False) -> SchedulerChoice:
    """Look a scheduler up by name, alias or A1111 label (case-insensitive); ``flow``: on a flow-matching base."""
    table = FLOW_SCHEDULERS if flow else SCHEDULERS
    key = name.strip().lower().replace(" ", "_").replace("-", "_")
    key = ALIASES.get(key, key)
    if key in table:
        return table[key]
    for choice in table.values():
        if choice.label.lower() == name.strip().lower():
            return choice
    if flow and (key in SCHEDULERS or any(c.label.lower() == name.strip().lower() for c in SCHEDULERS.values())):
        raise ConfigError(f"scheduler {name!r} is for noise-prediction bases; this flow-matching base (FLUX.1 / SD3) "
                          f"samples with {', '.join(FLOW_SCHEDULERS)} only")
    raise ConfigError(f"scheduler {name!r} is not known; choose one of {', '.join(table)}")


def build_scheduler(name: str | None, original, flow: bool = False) -> Any:
    """A fresh scheduler: ``name``'s class from the pipeline's own config, or the original's class."""
    import diffusers

    if name is None:
        return type(original).from_config(original.config)
    choice = scheduler_choice(name, flow)
    cls = getattr(diffusers, choice.class_name)
    return cls.from_config(original.config, **choice.options)


def label_of_scheduler(name: str | None, original, flow: bool = False) -> str:
    """The A1111 label of a scheduler name, or of the pipeline's own scheduler class."""
    if name is not None:
        return scheduler_choice(name, flow).label
    for choice in (*FLOW_SCHEDULERS.values(), *SCHEDULERS.values()):
        if choice.class_name == type(original).__name__ and not choice.options:
            return choice.label
    return type(original).__name__
