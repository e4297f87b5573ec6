"""The in-memory oracle of compress: every adapter held at once, Gram matrices of the stacked
factors, no streaming. Tests check `studio.subspace.stream.compress_events` (what every front end
runs) against it, and benchmarks time it as a labelled in-memory kernel row. No front end calls
anything here.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

import torch
from torch import Tensor

from studio.adapters.lora import LoraAdapter
from studio.errors import StudioError
from studio.subspace.collection import AdapterRecord, CompressedCollection, LayerShape, layer_tensors, pack_loadings
from studio.subspace.extract import Directions, LayerSubspace, SubspaceSpec, build_subspace, chunks, directions_batch, layer_seed, reference_extract, warn_clamped
from studio.subspace.reconstruct import Factors, collection_factors, reconstruct, reconstruct_all
from studio.subspace.sources import check_bases, check_names, content_sha256, factor_bytes
from studio.subspace.statistics import check_shape

Method = Literal["ours", "reference"]


@dataclass
class OracleAdapter:
    """One adapter's reconstruction by the oracle."""

    name: str
    rel_error: float
    bytes_in: int
    bytes_out: int
    layer_errors: dict[str, float] = field(default_factory=dict)
    sha256: str = ""


@dataclass
class OracleResult:
    """What `gram_compress` did: per adapter errors and sizes, the components, the collection."""

    adapters: list[OracleAdapter]
    bytes_in: int
    bytes_out: int
    layers: dict[str, LayerSubspace]
    collection: CompressedCollection
    path: Path | None = None

    @property
    def k(self) -> dict[str, int]:
        return {name: sub.k for name, sub in self.layers.items()}


def fit_subspaces(collection: Sequence[Factors], spec: SubspaceSpec, method: Method = "ours") -> dict[str, LayerSubspace]:
    """Per-layer components of a collection in memory; a layer uses the adapters that have it.

    Ours stacks the layers whose stacked factors have equal shapes and eigendecomposes their
    Gram matrices in one batched call (`directions_batch`)."""
    names = sorted({layer for factors in collection for layer in factors})
    members = {name: [factors[name] for factors in collection if name in factors] for name in names}
    if method == "reference":
        if spec.k is None:
            raise ValueError("the reference procedure takes a fixed k, not an energy threshold")
        return {name: reference_extract([d for d, _ in pairs], [u for _, u in pairs], spec.k) for name, pairs in members.items()}
    down = _batched_directions({name: [d.reshape(d.shape[0], -1) for d, _ in pairs] for name, pairs in members.items()})
    up = _batched_directions({name: [u.reshape(u.shape[0], -1).T for _, u in pairs] for name, pairs in members.items()})
    subspaces = {
        name: build_subspace(down[name], up[name], spec, layer_seed(spec.seed, name), down[name].vectors.shape[0], up[name].vectors.shape[0])
        for name in names
    }
    warn_clamped(subspaces, spec.augment)
    return subspaces


def _batched_directions(rows: dict[str, list[Tensor]]) -> dict[str, Directions]:
    """Directions of each layer's stacked rows; layers of equal stacked shape share one eigh."""
    groups: dict[tuple[int, int], list[str]] = {}
    for name, parts in rows.items():
        groups.setdefault((sum(p.shape[0] for p in parts), parts[0].shape[1]), []).append(name)
    result = {}
    for (count, dim), names in groups.items():
        for part in chunks(len(names), count * max(count, dim)):
            batch = [names[j] for j in part]
            stacked = torch.stack([torch.cat(rows[name]) for name in batch])
            result.update(zip(batch, directions_batch(stacked)))
    return result


def _record(adapter: LoraAdapter, sha256: str, error: float, bytes_in: int) -> AdapterRecord:
    return AdapterRecord(
        name=adapter.name, sha256=sha256, rel_error=error,
        ranks={n: l.rank for n, l in adapter.lora_layers.items()}, alphas={n: float(l.alpha) for n, l in adapter.lora_layers.items()},
        metadata=dict(adapter.metadata), source_format=str(adapter.source_format), base_arch=str(getattr(adapter, "base_arch", "")),
        bytes_in=bytes_in,
    )


def gram_compress(
    adapters: list[LoraAdapter],
    k: int | None = None,
    energy: float | None = None,
    augment: int = 0,
    base_id: str = "",
    seed: int = 0,
    output: str | Path | None = None,
    device: torch.device | str = "cpu",
) -> OracleResult:
    """The test oracle: adapters held in memory -> shared components + per-adapter loadings, from
    the Gram matrices of ALL stacked factors at once (no statistics, no second pass, no report).

    Exactly one of ``k`` (components per layer) or ``energy`` (explained fraction) is given.
    With ``output`` the collection is also written there (atomically).
    """
    spec = SubspaceSpec(k=k, energy=energy, augment=augment, seed=seed)
    if not adapters:
        raise StudioError("compress needs at least one adapter")
    check_names([a.name for a in adapters])
    base_id = base_id or check_bases(getattr(a, "base_arch", "") for a in adapters)
    shapes: dict[str, LayerShape] = {}
    for adapter in adapters:
        for name, layer in adapter.lora_layers.items():
            check_shape(shapes, name, LayerShape.of(layer), adapter.name)
    factors = collection_factors(adapters, True, device)
    layers = fit_subspaces(factors, spec)
    records, loadings, reports = [], [], []
    for adapter, rebuilt in zip(adapters, reconstruct_all(factors, layers)):
        flat = pack_loadings(rebuilt.loadings, list(layers))
        record = _record(adapter, content_sha256(adapter), rebuilt.total.relative, factor_bytes(adapter))
        records.append(record)
        loadings.append(flat)
        reports.append(OracleAdapter(adapter.name, record.rel_error, record.bytes_in, flat.nbytes, {n: p.relative for n, p in rebuilt.parts.items()}, record.sha256))
    layers_cpu = {name: _to_cpu(sub) for name, sub in layers.items()}
    collection = CompressedCollection(layers_cpu, {n: shapes[n] for n in layers}, [r.summary() for r in records], base_id, spec.as_json(), None, records, loadings)
    path = collection.save(output) if output is not None else None
    bytes_out = path.stat().st_size if path else sum(t.nbytes for s in layers_cpu.values() for t in layer_tensors(0, s).values()) + sum(f.nbytes for f in loadings)
    return OracleResult(reports, sum(r.bytes_in for r in reports), bytes_out, layers_cpu, collection, path)


def _to_cpu(sub: LayerSubspace) -> LayerSubspace:
    return LayerSubspace(sub.down_components.cpu(), sub.up_components.cpu(), sub.down_explained.cpu(), sub.up_explained.cpu(), sub.requested_k, sub.principal_k, sub.augment)


def leave_one_out(
    adapters: list[LoraAdapter], k: int | None = None, energy: float | None = None, augment: int = 0, seed: int = 0,
    method: Method = "ours", device: torch.device | str = "cpu",
) -> list[float]:
    """Error of each adapter projected onto the subspace of all the others (generalisation)."""
    spec = SubspaceSpec(k=k, energy=energy, augment=augment, seed=seed)
    collection = collection_factors(adapters, method == "ours", device)
    errors = []
    for i, factors in enumerate(collection):
        others = collection[:i] + collection[i + 1 :]
        if not others:
            errors.append(1.0)
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            layers = fit_subspaces(others, spec, method)
        errors.append(reconstruct(factors, layers).total.relative)
    return errors


def reconstruction_errors(adapters: list[LoraAdapter], k: int, method: Method = "ours", seed: int = 0, device: torch.device | str = "cpu") -> list[float]:
    """Error of every adapter reconstructed from the subspace of the whole collection at ``k``."""
    spec = SubspaceSpec(k=k, seed=seed)
    collection = collection_factors(adapters, method == "ours", device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layers = fit_subspaces(collection, spec, method)
    return [rebuilt.total.relative for rebuilt in reconstruct_all(collection, layers)]


