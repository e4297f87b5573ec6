"""An adapter against a collection's components: loadings and reconstruction error.

`reconstruct_all` projects adapters held in memory onto per-layer components (batched per layer
and rank); `project_adapter` is `studio project`: an unseen adapter onto a collection file's
components, as an EigenLoRA adapter with its error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from studio.adapters.eigenlora import EigenLoraAdapter, EigenLoraLayer
from studio.adapters.lora import LoraAdapter
from studio.errors import StudioError
from studio.subspace.collection import CompressedCollection, LayerShape
from studio.subspace.extract import LayerSubspace
from studio.subspace.project import ErrorParts, error_parts, error_parts_batch, project, total_error
from studio.subspace.statistics import canonical_layers

Factors = dict[str, tuple[Tensor, Tensor]]


@dataclass
class ProjectResult:
    """An adapter projected onto a collection's components, and how much of it survives."""

    name: str
    rel_error: float
    layer_errors: dict[str, float]
    uncovered_layers: list[str]
    adapter: EigenLoraAdapter

    def as_json(self) -> dict:
        worst = sorted(self.layer_errors.items(), key=lambda item: -item[1])[:5]
        return {"name": self.name, "rel_error": self.rel_error, "uncovered_layers": self.uncovered_layers, "worst_layers": dict(worst)}


def adapter_factors(adapter: LoraAdapter, canonicalise: bool = True, device: torch.device | str = "cpu") -> Factors:
    """``{layer: (A, B)}`` with the scale folded in: canonical (ours) or as stored (reference)."""
    return collection_factors([adapter], canonicalise, device)[0]


def collection_factors(adapters: Sequence[LoraAdapter], canonicalise: bool = True, device: torch.device | str = "cpu") -> list[Factors]:
    """`adapter_factors` of every adapter; canonical forms of all equal-shape layers of all
    adapters are computed in batched calls (`canonical_layers`)."""
    if not canonicalise:
        return [{name: tuple(t.to(device) for t in layer.factors()) for name, layer in adapter.lora_layers.items()} for adapter in adapters]
    keys = [(i, name) for i, adapter in enumerate(adapters) for name in adapter.lora_layers]
    canonicals = canonical_layers([adapters[i].lora_layers[name] for i, name in keys], device)
    result: list[Factors] = [{} for _ in adapters]
    for (i, name), factors in zip(keys, canonicals):
        result[i][name] = factors
    return result


@dataclass
class Reconstruction:
    loadings: dict[str, tuple[Tensor, Tensor]]
    parts: dict[str, ErrorParts]
    uncovered: list[str]

    @property
    def total(self) -> ErrorParts:
        return total_error(list(self.parts.values()))


def reconstruct(factors: Factors, layers: dict[str, LayerSubspace]) -> Reconstruction:
    """Loadings and error parts of one adapter; a layer without components counts as lost."""
    return reconstruct_all([factors], layers)[0]


def reconstruct_all(collection: Sequence[Factors], layers: dict[str, LayerSubspace]) -> list[Reconstruction]:
    """`reconstruct` of every adapter: per layer, the adapters of one rank are projected together
    (batched matmuls); loadings come back on the CPU (one copy per layer and rank), error parts
    are read from the device once for everything."""
    loadings: list[dict] = [{} for _ in collection]
    pending: list[tuple[list[tuple[int, str]], Tensor, Tensor]] = []  # (adapter, layer) keys, residuals, totals
    for name, sub in layers.items():
        groups: dict[tuple, list[int]] = {}
        for i, factors in enumerate(collection):
            if name in factors:
                groups.setdefault(tuple(factors[name][0].shape), []).append(i)
        for members in groups.values():
            downs = torch.stack([collection[i][name][0] for i in members])
            ups = torch.stack([collection[i][name][1] for i in members])
            down_components, up_components = sub.down_components.to(downs.device), sub.up_components.to(downs.device)
            alphas, betas = project(downs, ups, down_components, up_components)
            alphas, betas = alphas.cpu(), betas.cpu()
            for j, i in enumerate(members):
                loadings[i][name] = (alphas[j], betas[j])
            pending.append(([(i, name) for i in members], *error_parts_batch(downs, ups, down_components, up_components)))
    values = torch.cat([torch.stack([r, t], dim=1).cpu() for _, r, t in pending]).tolist() if pending else []
    found = dict(zip([key for keys, _, _ in pending for key in keys], values))
    result = []
    for i, factors in enumerate(collection):
        parts, uncovered = {}, []
        for name, (down, up) in factors.items():
            if (i, name) in found:
                parts[name] = ErrorParts(*found[(i, name)])
            else:
                parts[name] = error_parts(down, up, down.new_zeros(0, down.shape[1]), up.new_zeros(up.shape[0], 0))
                uncovered.append(name)
        result.append(Reconstruction(loadings[i], parts, uncovered))
    return result


def project_adapter(collection: CompressedCollection, adapter: LoraAdapter, device: torch.device | str = "cpu") -> ProjectResult:
    """Project an (unseen) adapter onto a collection's components; report its error.

    Layers the collection has no components for are lost: they count fully in the error and
    are listed in ``uncovered_layers``. A layer whose shape differs is refused.
    """
    for name, layer in adapter.lora_layers.items():
        if name in collection.shapes and collection.shapes[name] != LayerShape.of(layer):
            raise StudioError(f"adapter {adapter.name!r}: layer {name!r} does not have the collection's shape {collection.shapes[name]}")
    rebuilt = reconstruct(adapter_factors(adapter, True, device), collection.layers)
    modules = {
        name: EigenLoraLayer(collection.layers[name].down_components, collection.layers[name].up_components, alpha.cpu(), beta.cpu())
        for name, (alpha, beta) in rebuilt.loadings.items()
    }
    shapes = {name: collection.shapes[name].weight_shapes(adapter.lora_layers[name].rank) for name in modules}
    projected = EigenLoraAdapter(adapter.name, modules, adapter.metadata, shapes)
    return ProjectResult(adapter.name, rebuilt.total.relative, {n: p.relative for n, p in rebuilt.parts.items()}, rebuilt.uncovered, projected)
