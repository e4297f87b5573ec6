"""Events that long verbs yield: the CLI draws a progress bar, the app draws plots, tests assert."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Progress:
    """One step of ``total`` done; ``loss`` and ``metrics`` where the job has them."""

    step: int
    total: int
    loss: float | None = None
    stage: str = ""
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class Sample:
    """A sample image produced during a job (training previews)."""

    step: int
    image: Any  # PIL.Image.Image
    prompt: str = ""
    label: str = ""  # "base": the same prompt and seed without the adapter, for comparison


@dataclass
class Message:
    """Something the user should read (a warning, a restored checkpoint, a skipped file)."""

    text: str
    level: str = "info"


@dataclass
class Saved:
    """A file was written (atomically)."""

    path: Path
    kind: str = ""


@dataclass
class Done:
    """The job finished; ``result`` is the verb's return value."""

    result: Any


Event = Progress | Sample | Message | Saved | Done


def run_to_end(events) -> Any:
    """Drain an event generator and return the result of its ``Done`` event."""
    result = None
    for event in events:
        if isinstance(event, Done):
            result = event.result
    return result
