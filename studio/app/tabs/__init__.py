"""One module per tab; each has ``build(studio) -> Tab`` with its refresh function and outputs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass
class Tab:
    """A built tab: its gradio Tab, and what to refresh when it is shown or the page loads
    (``refresh`` takes the values of ``inputs``: what the user has picked is kept)."""

    tab: Any
    refresh: Callable[..., Any] | None = None
    outputs: list[Any] = field(default_factory=list)
    inputs: list[Any] = field(default_factory=list)
