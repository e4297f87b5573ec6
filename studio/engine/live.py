"""Adapters prepared for a live pipeline: which modules can be targeted, the prepared-update cache.

The merging itself is ``studio.engine.patch.MergedWeights`` (pristine W0, stacked weight groups,
one batched kernel per group and term, finite check). ``PreparedCache`` keeps each adapter's
terms on the device (LRU, byte budget), so a switch is a few batched kernels and never a
recomputation. ``merge_plan`` turns a mix into the per-group terms ``MergedWeights.write`` takes.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from torch import nn

from studio.adapters.base import Adapter
from studio.engine.mix import Mix, label_of
from studio.engine.patch import MergedWeights, MergeFrom, Planned, Term, WeightGroup, first_non_finite, group_terms
from studio.errors import KeyMismatchError, StudioError


class NonFiniteUpdateError(StudioError):
    """An adapter's update, or the weights merged with it, is not finite (NaN, inf, overflow)."""


def targetable_modules(components: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """Every Linear / Conv2d of the components, keyed by prefixed module name."""
    found: dict[str, nn.Module] = {}
    for component_name, component in components.items():
        for module_name, module in component.named_modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                found[f"{component_name}.{module_name}"] = module
    return found


def check_layers(adapter: Adapter, modules: dict[str, nn.Module], label: str = "") -> None:
    """Raise KeyMismatchError naming how many of the adapter's layers the pipeline lacks."""
    layers = adapter.layers()
    missing = [layer for layer in layers if layer not in modules]
    if missing:
        examples = ", ".join(missing[:3])
        raise KeyMismatchError(
            f"adapter {label or label_of(adapter)!r} targets {len(missing)} of {len(layers)} layers that this "
            f"pipeline lacks (e.g. {examples}); is it made for another base model?"
        )


@dataclass
class PreparedAdapter:
    """An adapter's updates on the device as terms per weight group, ready to merge."""

    adapter: Adapter
    terms: dict[WeightGroup, list[Term]]

    @property
    def nbytes(self) -> int:
        return sum(term.nbytes for terms in self.terms.values() for term in terms)


def prepare(adapter: Adapter, weights: MergedWeights, merge_from: MergeFrom = "auto", label: str = "") -> PreparedAdapter:
    """Check an adapter against the modules and compute its terms on each group's device and dtype.

    Refuses (``NonFiniteUpdateError``) an update that is not finite once cast to the weights'
    dtype (an fp16 overflow of a huge alpha, say), naming the adapter and the layer.
    """
    check_layers(adapter, weights.modules, label)
    terms = group_terms(adapter, weights, merge_from)
    bad = first_non_finite(terms)
    if bad is not None:
        dtype = weights.modules[bad].weight.dtype
        raise NonFiniteUpdateError(
            f"adapter {label or label_of(adapter)!r}: its update of layer {bad} is not finite in {dtype} "
            "(NaN/inf, or values beyond the dtype's range: check the file's alpha and weights)"
        )
    return PreparedAdapter(adapter, terms)


class PreparedCache:
    """Prepared adapters by identity, least recently used first out past ``budget_bytes``."""

    def __init__(self, budget_bytes: int):
        self.budget_bytes = budget_bytes
        self._entries: OrderedDict[int, PreparedAdapter] = OrderedDict()

    def get(self, adapter: Adapter, weights: MergedWeights, merge_from: MergeFrom, label: str = "") -> PreparedAdapter:
        key = id(adapter)
        entry = self._entries.get(key)
        if entry is not None and entry.adapter is adapter:
            self._entries.move_to_end(key)
            return entry
        entry = prepare(adapter, weights, merge_from, label)
        self._entries[key] = entry  # holds the adapter, so its id is not reused while cached
        self._evict(keep=key)
        return entry

    def forget(self, adapter: Adapter) -> None:
        """Drop an adapter's prepared updates (call after changing its parameters, e.g. training)."""
        self._entries.pop(id(adapter), None)

    def clear(self) -> None:
        self._entries.clear()

    @property
    def nbytes(self) -> int:
        return sum(entry.nbytes for entry in self._entries.values())

    def _evict(self, keep: int) -> None:
        while self.nbytes > self.budget_bytes and len(self._entries) > 1:
            oldest = next(iter(self._entries))
            if oldest == keep:
                break
            self._entries.pop(oldest)


def merge_plan(mix: Mix, prepared: list[PreparedAdapter]) -> dict[WeightGroup, Planned]:
    """Per group, the (term, weight, label) of a mix, in the mix's order (deterministic)."""
    plan: dict[WeightGroup, Planned] = {}
    for term, entry in zip(mix.terms, prepared):
        if term.weight == 0:
            continue
        for group, terms in entry.terms.items():
            plan.setdefault(group, []).extend((t, term.weight, term.label) for t in terms)
    return plan
