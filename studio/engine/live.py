"""Live weights of a pipeline: pristine copies, in-place merging, drift-free switching.

``LiveWeights`` owns the targetable Linear / Conv2d weights of some components (``unet``,
``text_encoder``, ...). The first time a layer is touched its weight is copied (``W0``, on the
same device and dtype); from then on every write is computed from ``W0``, never from the current
weight, so A -> B -> A leaves exactly the bits of applying A once. Layers whose terms did not
change are not rewritten, so switching costs one kernel per layer that differs.

``PreparedCache`` keeps each adapter's per-layer updates on the device (LRU, byte budget), so a
switch is a copy/add per layer and never a recomputation.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from studio.adapters.base import Adapter
from studio.engine.mix import Mix, label_of
from studio.engine.updates import LayerUpdate, MergeFrom, prepare_layer
from studio.errors import KeyMismatchError

Terms = list[tuple[LayerUpdate, float]]


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
    """An adapter's updates on the device, ready to merge."""

    adapter: Adapter
    updates: dict[str, LayerUpdate]

    @property
    def nbytes(self) -> int:
        return sum(update.nbytes for update in self.updates.values())


class LiveWeights:
    """The targetable weights of some modules, their pristine copies, and what is merged now."""

    def __init__(self, components: dict[str, nn.Module]):
        self.modules = targetable_modules(components)
        self._pristine: dict[str, Tensor] = {}
        self._views: dict[str, Tensor] = {}  # live 2-D views, rebuilt if a weight's storage moved
        self._written: dict[str, Terms] = {}  # layer -> the terms merged into it now (held, compared by identity)

    def shape2d(self, layer: str) -> tuple[int, int]:
        weight = self.modules[layer].weight
        return int(weight.shape[0]), int(weight[0].numel())

    def live2d(self, layer: str) -> Tensor:
        """The live weight as a 2-D view sharing its storage (cached: switching is per-layer Python)."""
        view = self._views.get(layer)
        weight = self.modules[layer].weight
        if view is None or view.data_ptr() != weight.data_ptr():
            view = self._views[layer] = weight.detach().view(weight.shape[0], -1)
        return view

    def pristine2d(self, layer: str) -> Tensor:
        """The pristine W0 of a layer (copied the first time; untouched layers are pristine)."""
        if layer not in self._pristine:
            self._pristine[layer] = self.live2d(layer).clone()
        return self._pristine[layer]

    @property
    def touched(self) -> list[str]:
        """Layers whose live weight differs from W0 now."""
        return list(self._written)

    def write(self, plan: dict[str, Terms]) -> None:
        """Make the live weights ``W0 + sum(weight * dW)`` per the plan, W0 everywhere else."""
        try:
            with torch.no_grad():
                for layer in [name for name in self._written if name not in plan]:
                    self.live2d(layer).copy_(self._pristine[layer])
                    del self._written[layer]
                for layer, terms in plan.items():
                    self._write_layer(layer, terms)
        except BaseException:
            self.restore()
            raise

    def _write_layer(self, layer: str, terms: Terms) -> None:
        if _same_terms(self._written.get(layer), terms):
            return
        self._written.pop(layer, None)
        pristine, live = self.pristine2d(layer), self.live2d(layer)
        first, first_weight = terms[0]
        first.write(pristine, live, first_weight)
        for update, weight in terms[1:]:
            update.accumulate(live, weight)
        self._written[layer] = list(terms)

    def restore(self) -> None:
        """Put W0 back into every touched layer."""
        with torch.no_grad():
            for layer in list(self._written):
                self.live2d(layer).copy_(self._pristine[layer])
                del self._written[layer]

    @torch.no_grad()
    def prepare(self, adapter: Adapter, merge_from: MergeFrom = "auto", label: str = "") -> PreparedAdapter:
        """Compute an adapter's updates on the device and dtype of each targeted weight."""
        check_layers(adapter, self.modules, label)
        updates = {}
        for layer in adapter.layers():
            weight = self.modules[layer].weight
            updates[layer] = prepare_layer(adapter, layer, self.shape2d(layer), merge_from, weight.device, weight.dtype)
        return PreparedAdapter(adapter, updates)


def _same_terms(old: Terms | None, new: Terms) -> bool:
    if old is None or len(old) != len(new):
        return False
    return all(a is b and wa == wb for (a, wa), (b, wb) in zip(old, new))


class PreparedCache:
    """Prepared adapters by identity, least recently used first out past ``budget_bytes``."""

    def __init__(self, budget_bytes: int):
        self.budget_bytes = budget_bytes
        self._entries: OrderedDict[int, PreparedAdapter] = OrderedDict()

    def get(self, adapter: Adapter, live: LiveWeights, merge_from: MergeFrom, label: str = "") -> PreparedAdapter:
        key = id(adapter)
        entry = self._entries.get(key)
        if entry is not None and entry.adapter is adapter:
            self._entries.move_to_end(key)
            return entry
        entry = live.prepare(adapter, merge_from, label)
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


def merge_plan(mix: Mix, prepared: list[PreparedAdapter]) -> dict[str, Terms]:
    """Per layer, the (update, weight) terms of a mix, in the mix's order (deterministic)."""
    plan: dict[str, Terms] = {}
    for term, entry in zip(mix.terms, prepared):
        if term.weight == 0:
            continue
        for layer, update in entry.updates.items():
            plan.setdefault(layer, []).append((update, term.weight))
    return plan
