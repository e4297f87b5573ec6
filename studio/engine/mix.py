"""What to apply: a weighted set of adapters (a mix). One adapter is a mix of one term."""

from __future__ import annotations

from dataclasses import dataclass

from studio.adapters.base import Adapter


@dataclass(frozen=True, eq=False)
class MixTerm:
    """One adapter at one weight; ``label`` is the name shown in PNG info and grids."""

    adapter: Adapter
    weight: float = 1.0
    label: str = ""


@dataclass(frozen=True, eq=False)
class Mix:
    """Adapters applied at once: ``W = W0 + sum_i weight_i * dW_i``."""

    terms: tuple[MixTerm, ...] = ()

    def scaled(self, scale: float) -> "Mix":
        """The same mix with every weight multiplied by ``scale`` (the user's overall strength)."""
        if scale == 1.0:
            return self
        return Mix(tuple(MixTerm(t.adapter, t.weight * scale, t.label) for t in self.terms))

    @property
    def labels(self) -> list[tuple[str, float]]:
        return [(t.label, t.weight) for t in self.terms]

    def __bool__(self) -> bool:
        return bool(self.terms)


def label_of(adapter: Adapter) -> str:
    """A display name for an adapter: its own ``name`` where it has one."""
    name = getattr(adapter, "name", "")
    return str(name) if name else type(adapter).__name__
