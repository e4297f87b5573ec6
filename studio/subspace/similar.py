"""Which adapters are close to one adapter in weight space (`studio similar FILE COLLECTION`).

Closeness is between updates dW (all layers, scale folded in), never file bytes: cosine
<dW_q, dW_j> / (|dW_q| |dW_j|), relative distance |dW_q - dW_j| / max(|dW_q|, |dW_j|) and the norm
ratio, all from r x r / K x K products of factors (no out x in matrix). Against a compressed
collection the stored adapters are their reconstructions U beta alpha V (each row says the stored
reconstruction error); against files or adapters in memory the comparison is exact and streams one
adapter at a time.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch
from torch import Tensor

from studio.adapters.lora import LoraAdapter
from studio.subspace.collection import CompressedCollection, is_collection_file
from studio.subspace.reconstruct import adapter_factors
from studio.subspace.report import pair_kind
from studio.subspace.sources import file_sources

Factors = dict[str, tuple[Tensor, Tensor]]


@dataclass
class SimilarRow:
    """One adapter of the collection against the query."""

    name: str
    cosine: float
    rel_distance: float
    norm_ratio: float  # |dW_j| / |dW_query|
    kind: str
    reconstruction_error: float | None = None  # set when compared through a collection's reconstruction


@dataclass
class SimilarResult:
    """The collection's adapters ranked by cosine to the query (closest first)."""

    query: str
    against: str
    rows: list[SimilarRow]

    def as_json(self) -> dict:
        return {"query": self.query, "against": self.against, "rows": [asdict(row) for row in self.rows]}


def _energy(factors: Factors) -> float:
    return float(sum(((b.double().T @ b.double()) * (a.double() @ a.double().T)).sum() for a, b in factors.values()))


def _inner(first: Factors, second: Factors) -> float:
    """<dW_1, dW_2> summed over the layers both have: tr((B1^T B2)(A2 A1^T)) per layer."""
    total = 0.0
    for name, (a1, b1) in first.items():
        if name in second:
            a2, b2 = second[name]
            total += float(((b1.double().T @ b2.double()) * (a1.double() @ a2.double().T)).sum())
    return total


def _row(name: str, inner: float, query_energy: float, energy: float, error: float | None = None) -> SimilarRow:
    qn, n = math.sqrt(max(query_energy, 0.0)), math.sqrt(max(energy, 0.0))
    cosine = inner / (qn * n) if qn > 0 and n > 0 else 0.0
    largest = max(qn, n)
    distance = math.sqrt(max(query_energy + energy - 2 * inner, 0.0)) / largest if largest > 0 else 0.0
    ratio = n / qn if qn > 0 else float("inf")
    return SimilarRow(name, cosine, distance, ratio, pair_kind(cosine, distance, ratio), error)


def _against_collection(query: Factors, collection: CompressedCollection, query_energy: float) -> list[SimilarRow]:
    """Each stored adapter's reconstruction: <dW_q, U C V> = sum(C * (U^T B_q)(A_q V^T)), |U C V|^2 = |C|^2 with C = beta alpha."""
    projected = {}
    for name, (a, b) in query.items():
        if name in collection.layers:
            sub = collection.layers[name]
            projected[name] = (sub.up_components.double().T @ b.double()) @ (a.double() @ sub.down_components.double().T)
    rows = []
    for stored in collection.names:
        inner, energy = 0.0, 0.0
        for name, (alpha, beta) in collection.loadings(stored).items():
            core = beta.double() @ alpha.double()
            energy += float(core.square().sum())
            if name in projected:
                inner += float((core * projected[name]).sum())
        rows.append(_row(stored, inner, query_energy, energy, collection.record(stored).rel_error))
    return rows


def _adapters(against: Sequence[str | Path | LoraAdapter]) -> Iterator[LoraAdapter]:
    paths = [item for item in against if not isinstance(item, LoraAdapter)]
    held = {id(item): item for item in against if isinstance(item, LoraAdapter)}
    for item in against:
        if isinstance(item, LoraAdapter):
            yield held[id(item)]
    for source in file_sources(paths) if paths else []:
        if not is_collection_file(source.path):
            yield source.load()


def similar(
    query: str | Path | LoraAdapter, against: str | Path | CompressedCollection | Iterable[str | Path | LoraAdapter], device: torch.device | str = "cpu"
) -> SimilarResult:
    """Rank ``against`` (a collection file or object, or LoRA files / folders / adapters) by closeness
    of their updates to ``query`` (a LoRA file or adapter)."""
    from studio.formats import load_adapter

    adapter = query if isinstance(query, LoraAdapter) else load_adapter(query)
    factors = adapter_factors(adapter, True, device)
    energy = _energy(factors)
    if isinstance(against, (str, Path)) and Path(against).is_file() and is_collection_file(against):
        against = CompressedCollection.load(against)
    if isinstance(against, CompressedCollection):
        rows, label = _against_collection(factors, against, energy), str(against.path or "collection in memory")
    else:
        items = [against] if isinstance(against, (str, Path)) else list(against)
        rows = []
        for other in _adapters(items):
            theirs = adapter_factors(other, True, device)
            rows.append(_row(other.name, _inner(factors, theirs), energy, _energy(theirs)))
        label = ", ".join(str(i) if not isinstance(i, LoraAdapter) else i.name for i in items)
    rows.sort(key=lambda row: -row.cosine)
    return SimilarResult(adapter.name, label, rows)

