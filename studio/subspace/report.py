"""Know your collection: what its principal subspace is worth, and which adapters are near copies.

Per adapter and overall (relative Frobenius errors of dW over all layers):
- ``in_sample``: reconstructed from the collection's own components (what the file stores);
- ``loo``: leave-one-out, from the components of all OTHER adapters at the same K per layer
  (principal components only); the collection's promise for an unseen adapter;
- ``mean``: the mean-adapter baseline, the best multiple of the mean update of the others
  (a one-direction model: sqrt(1 - cos^2(dW_i, sum_{j != i} dW_j)));
- ``random``: projection onto a seeded random orthonormal subspace of the same K per layer;
- ``svd``: the adapter's own truncated SVD given the same numbers it costs in the collection
  (its loadings, 2 r K per layer, plus its share 1/N of the components, K (in + out) per layer),
  ranks spread over its layers greedily by energy per number (the pure-compression baseline).

Update inner products <dW_i, dW_j> (cosine, relative distance) give the near-duplicate table:
exact from the Gram matrices on gram-route layers, estimated by a tensor sketch elsewhere.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

SIMILAR_COSINE = 0.8  # pairs listed in the duplicates table from this |cosine| up
NEAR_COSINE = 0.98
EXACT_DISTANCE = 1e-4  # relative distance under which two updates are the same (float32 factors)
RESCALED_COSINE = 1 - 1e-6
MAX_PAIRS = 100
# Shared structure: the others' subspace captures (1 - LOO^2) of an unseen adapter's energy; it
# counts when that is at least MIN_CAPTURED and STRUCTURE_GAIN times what the better baseline
# (mean adapter or random subspace) captures. The same test decides "structure of the mean only".
STRUCTURE_GAIN = 2.0
MIN_CAPTURED = 0.1
MIN_ADAPTERS = 3


def relative(residual: float, total: float) -> float:
    """sqrt(residual / total), 0 for an empty update."""
    return math.sqrt(max(residual, 0.0) / total) if total > 0 else 0.0


@dataclass
class AdapterQuality:
    """One adapter's errors under the collection and the baselines (None: not computed)."""

    name: str
    in_sample: float
    loo: float | None
    mean: float | None
    random: float
    svd: float
    norm: float  # ||dW||_F over all layers


@dataclass
class SimilarPair:
    """Two adapters whose updates point the same way."""

    first: str
    second: str
    cosine: float
    rel_distance: float  # ||dW_1 - dW_2|| / max(||dW_1||, ||dW_2||)
    norm_ratio: float  # ||dW_2|| / ||dW_1||
    kind: str

    def as_json(self) -> dict:
        return asdict(self)


def pair_kind(cosine: float, rel_distance: float, norm_ratio: float) -> str:
    """"exact duplicate", "rescaled copy (x s)", "near duplicate" or "related" (e.g. checkpoints of one run)."""
    if rel_distance <= EXACT_DISTANCE:
        return "exact duplicate"
    if abs(cosine) >= RESCALED_COSINE:
        return f"rescaled copy (x{norm_ratio:.3g}{', negated' if cosine < 0 else ''})"
    if abs(cosine) >= NEAR_COSINE:
        return "near duplicate"
    return "related (e.g. checkpoints of one run)"


def similar_pairs(names: list[str], products: Tensor) -> list[SimilarPair]:
    """Pairs with |cosine| >= `SIMILAR_COSINE` from the (N, N) update inner products, closest first."""
    norms = products.diagonal().clamp_min(0.0).sqrt()
    safe = norms.clamp_min(torch.finfo(torch.float64).tiny)
    cosines = products / safe.unsqueeze(0) / safe.unsqueeze(1)
    distances = (norms.unsqueeze(0) ** 2 + norms.unsqueeze(1) ** 2 - 2 * products).clamp_min(0.0).sqrt()
    largest = torch.maximum(norms.unsqueeze(0), norms.unsqueeze(1)).clamp_min(torch.finfo(torch.float64).tiny)
    pairs = []
    first, second = torch.triu_indices(len(names), len(names), 1)
    for i, j in zip(first.tolist(), second.tolist()):
        cosine = float(cosines[i, j])
        if abs(cosine) < SIMILAR_COSINE or norms[i] == 0 or norms[j] == 0:
            continue
        distance, ratio = float(distances[i, j] / largest[i, j]), float(norms[j] / norms[i])
        pairs.append(SimilarPair(names[i], names[j], cosine, distance, ratio, pair_kind(cosine, distance, ratio)))
    pairs.sort(key=lambda p: (-abs(p.cosine), p.rel_distance))
    return pairs[:MAX_PAIRS]


def mean_baseline(products: Tensor) -> list[float]:
    """Per adapter: sqrt(1 - cos^2(dW_i, m_i)) with m_i = sum of the OTHER adapters' updates."""
    rows = products.sum(1)
    total = products.sum()
    errors = []
    for i in range(products.shape[0]):
        inner = float(rows[i] - products[i, i])
        others = float(total - 2 * rows[i] + products[i, i])
        own = float(products[i, i])
        if own <= 0 or others <= 0:
            errors.append(1.0)
            continue
        errors.append(math.sqrt(max(0.0, 1.0 - inner * inner / (own * others))))
    return errors


def svd_baseline(singular: dict[str, Tensor], budgets: dict[str, float], costs: dict[str, int]) -> float:
    """Relative error of one adapter's truncated SVD with the numbers its collection share costs.

    ``singular``: per layer, singular values of dW; ``budgets``: per layer, numbers the adapter
    costs in the collection (summed into one budget); ``costs``: numbers per rank-1 term (in + out).
    Terms are taken greedily by squared singular value per number (within a layer that is the
    order of the values, so each layer keeps a leading prefix)."""
    budget = sum(budgets.values())
    terms, total = [], 0.0
    for layer, values in singular.items():
        squares = (values.double() ** 2).tolist()
        total += sum(squares)
        terms += [(s / costs[layer], s, costs[layer]) for s in squares]
    terms.sort(key=lambda t: -t[0])
    kept = 0.0
    for _, square, cost in terms:
        if cost <= budget:
            budget -= cost
            kept += square
    return relative(total - kept, total)


@dataclass
class CollectionReport:
    """The collection's numbers: per adapter, overall means, the verdict, the near-duplicates."""

    adapters: list[AdapterQuality]
    pairs: list[SimilarPair]
    loo_exact: bool
    loo_note: str
    products_exact: bool
    overall: dict[str, float | None] = field(default_factory=dict)
    verdict: str = ""
    shares_structure: bool | None = None

    def as_json(self) -> dict:
        return {
            "overall": self.overall, "verdict": self.verdict, "shares_structure": self.shares_structure,
            "loo_exact": self.loo_exact, "loo_note": self.loo_note, "products_exact": self.products_exact,
            "adapters": [asdict(a) for a in self.adapters], "duplicates": [p.as_json() for p in self.pairs],
        }

    def summary(self) -> dict:
        """What the collection file keeps: overall numbers and the verdict."""
        return {"overall": self.overall, "verdict": self.verdict, "shares_structure": self.shares_structure, "loo_exact": self.loo_exact}


def _mean(values: list[float | None]) -> float | None:
    found = [v for v in values if v is not None]
    return sum(found) / len(found) if found else None


def captured(error: float) -> float:
    """Fraction of an update's energy a model captures, from its relative error."""
    return max(0.0, 1.0 - error * error)


def _beats(error: float, baseline: float) -> bool:
    return captured(error) >= MIN_CAPTURED and captured(error) >= STRUCTURE_GAIN * captured(baseline)


def verdict(overall: dict[str, float | None], count: int) -> tuple[str, bool | None]:
    """One line saying whether the subspace carries shared structure (leave-one-out against the
    baselines, in captured energy), and for storage whether per-adapter SVD would do better; plus the flag."""
    loo, mean, rand, svd, inside = overall["loo"], overall["mean"], overall["random"], overall["svd"], overall["in_sample"]
    if count < MIN_ADAPTERS or loo is None or mean is None:
        return f"too few adapters ({count}) to judge shared structure (leave-one-out needs {MIN_ADAPTERS} or more)", None
    numbers = f"LOO {loo:.2f} vs mean {mean:.2f} vs random {rand:.2f}"
    if _beats(loo, min(mean, rand)):
        return f"this collection shares structure: {numbers}", True
    if svd <= inside:
        storage = f"use per-adapter SVD instead (error {svd:.2f} vs {inside:.2f} at the same bytes)"
    else:
        storage = f"for storage the collection still beats per-adapter SVD (error {inside:.2f} vs {svd:.2f} at the same bytes)"
    if _beats(mean, rand):
        return f"no structure beyond the mean adapter: {numbers}; {storage}", False
    return f"no shared structure: {numbers}; {storage}", False


def build_report(qualities: list[AdapterQuality], pairs: list[SimilarPair], loo_exact: bool, loo_note: str, products_exact: bool) -> CollectionReport:
    """Overall means (over adapters) and the verdict around the per-adapter numbers."""
    overall = {key: _mean([getattr(q, key) for q in qualities]) for key in ("in_sample", "loo", "mean", "random", "svd")}
    line, shares = verdict(overall, len(qualities))
    return CollectionReport(qualities, pairs, loo_exact, loo_note, products_exact, overall, line, shares)
