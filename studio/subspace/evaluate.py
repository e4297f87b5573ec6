"""The second pass of a compress: every adapter against the fitted components, batched.

For each (adapter, layer) it computes, from the canonical factors A (r, in), B (out, r) and r x r /
r x K products only (no out x in matrix):
- loadings alpha = A V^T, beta = U^T B and the in-sample error parts;
- the random-subspace baseline: the same projection onto seeded random orthonormal V, U of the
  layer's principal K;
- leave-one-out (on the sampled layers, see `LooPlan`): the top-K directions of the sums WITHOUT
  this adapter, S - A^T A (and S_B - B B^T), found in the basis of the sums' own top-m eigenvectors
  Q: in that basis the downdate is diag(lambda) - c^T c with c = A Q, an m x m eigh. Exact when m
  covers every direction of the sums (m = rank), a Rayleigh-Ritz estimate otherwise;
- the singular values of dW (squared row norms of the balanced A), for the per-adapter SVD baseline;
- on covariance-route layers, a tensor sketch of dW (CountSketch on both sides, `SKETCH_SIDE`^2
  numbers, summed over layers) whose dot products are unbiased estimates of <dW_i, dW_j>.
Residuals use ||dW - dW_hat||^2 = ||(B - B_hat) A||^2 + ||B_hat (A - A_hat)||^2 (the cross term vanishes
for orthonormal components), from the residual factors for the stored components and, for the
float64-orthonormal leave-one-out and random ones, as tr((B^T B - beta^T beta) A A^T) + tr(beta^T beta (A A^T - alpha alpha^T)).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from torch import Tensor

from studio.subspace.extract import RANK_TOLERANCE, SubspaceSpec, batched_eigh, layer_seed
from studio.subspace.statistics import FittedLayer

Factors = dict[str, tuple[Tensor, Tensor]]
LOO_MIN_DIRECTIONS = 128  # leave-one-out eigh size m at least this (capped by the directions the sums have)
LOO_PAIRS = 1024  # (adapter, layer) leave-one-out evaluations per compress before layers / adapters are sampled
LOO_MAX_ADAPTERS = 64  # adapters leave-one-out is computed for, at most (evenly spaced)
LOO_MIN_LAYERS = 8
LOO_NOISE = 1e-10  # a downdated sum whose top eigenvalue is below this fraction of the full sum's is empty
SKETCH_SIDE = 64  # tensor sketch of dW: SKETCH_SIDE x SKETCH_SIDE buckets per adapter
BLOCK_BYTES = 64 << 20  # float64 factor bytes evaluated in one batch ...
BLOCK_ADAPTERS = 8  # ... and at most this many adapters (memory stays flat from a few adapters on)
RANDOM_SEED = 0x5EED  # offsets of the per-layer seeds of the random baseline and the sketch hashes
SKETCH_SEED = 0xC0DE
RANDOM_THREADS = max(1, min(8, os.cpu_count() or 1))  # threads drawing the random baseline's bases (one seed per layer)


@dataclass
class LooPlan:
    """Which adapters and layers leave-one-out is computed on, and whether that is exact."""

    adapters: set[int]
    layers: set[str]
    total_layers: int
    total_adapters: int

    @property
    def sampled(self) -> bool:
        return len(self.layers) < self.total_layers or len(self.adapters) < self.total_adapters


def loo_plan(indices: list[int], layer_names: list[str]) -> LooPlan:
    """Evenly spaced adapters (at most `LOO_MAX_ADAPTERS`) and layers so that adapters x layers
    stays near `LOO_PAIRS` (at least `LOO_MIN_LAYERS` layers); everything for small collections."""
    chosen = _evenly(indices, LOO_MAX_ADAPTERS)
    layer_count = max(LOO_MIN_LAYERS, LOO_PAIRS // max(len(chosen), 1))
    return LooPlan(set(chosen), set(_evenly(layer_names, layer_count)), len(layer_names), len(indices))


def _evenly(items: list, count: int) -> list:
    if len(items) <= count:
        return list(items)
    return [items[round(j * (len(items) - 1) / (count - 1))] for j in range(count)] if count > 1 else items[:1]


@dataclass
class LayerPlan:
    """One layer's tensors for the second pass (float64, on the device)."""

    name: str
    down: Tensor  # (K, in) components as stored (float32 values)
    up: Tensor  # (out, K)
    random_down: Tensor  # (k, in), k = principal K
    random_up: Tensor  # (out, k)
    members: int  # adapters having the layer (shares the components' bytes)
    loo: tuple[Tensor, Tensor, Tensor, Tensor] | None = None  # Q_down (in, m), lambda_down (m,), Q_up (out, m'), lambda_up
    loo_exact: bool = True
    sketch: tuple[Tensor, Tensor, Tensor, Tensor] | None = None  # hash_out, sign_out, hash_in, sign_in

    @property
    def principal(self) -> int:
        return self.random_down.shape[0]


def layer_plans(fitted: dict[str, FittedLayer], loo_layers: set[str], seed: int, device: torch.device) -> dict[str, LayerPlan]:
    """The second pass's view of every fitted layer."""
    plans = {}
    with ThreadPoolExecutor(max_workers=RANDOM_THREADS, thread_name_prefix="studio-random") as pool:  # torch releases the GIL
        randoms = dict(zip(fitted, pool.map(lambda item: _random_basis(item[0], item[1].subspace, seed), fitted.items())))
    for name, layer in fitted.items():
        sub = layer.subspace
        k = sub.principal_k
        n_in, n_out = sub.down_components.shape[1], sub.up_components.shape[0]
        random_down, random_up = randoms[name]
        plan = LayerPlan(
            name, sub.down_components.to(device, torch.float64), sub.up_components.to(device, torch.float64),
            random_down.to(device), random_up.to(device), len(layer.members),
        )
        if name in loo_layers:
            plan.loo, plan.loo_exact = _loo_basis(layer, k, device)
        if layer.route == "covariance":
            plan.sketch = _sketch_hashes(name, n_in, n_out, seed, device)
        plans[name] = plan
    return plans


def _random_basis(name: str, sub, seed: int) -> tuple[Tensor, Tensor]:
    """The random-subspace baseline's seeded orthonormal (k, in) and (out, k) of one layer (CPU float64)."""
    generator = torch.Generator().manual_seed(layer_seed(seed + RANDOM_SEED, name))
    k, n_in, n_out = sub.principal_k, sub.down_components.shape[1], sub.up_components.shape[0]
    random_down = torch.linalg.qr(torch.randn(n_in, k, generator=generator, dtype=torch.float64))[0].T
    random_up = torch.linalg.qr(torch.randn(n_out, k, generator=generator, dtype=torch.float64))[0]
    return random_down, random_up


def directions_needed(spec: SubspaceSpec) -> int | None:
    """How many leading directions of each side the components and leave-one-out use at most (None:
    all, for an energy target); `CollectionStatistics.fit` forms no more than these."""
    return None if spec.k is None else max(spec.k, LOO_MIN_DIRECTIONS, 4 * spec.k)


def _loo_basis(layer: FittedLayer, k: int, device: torch.device) -> tuple[tuple[Tensor, Tensor, Tensor, Tensor], bool]:
    basis, exact = [], True
    for directions in (layer.down, layer.up):
        kept = directions.rank
        m = min(kept, max(LOO_MIN_DIRECTIONS, 4 * k))
        exact &= m == kept
        basis += [directions.vectors[:, :m].to(device, torch.float64), directions.energies[:m].to(device, torch.float64)]
    return tuple(basis), exact


def _sketch_hashes(name: str, n_in: int, n_out: int, seed: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    generator = torch.Generator().manual_seed(layer_seed(seed + SKETCH_SEED, name))
    hashes = []
    for size in (n_out, n_in):
        hashes.append(torch.randint(0, SKETCH_SIDE, (size,), generator=generator).to(device))
        hashes.append((torch.randint(0, 2, (size,), generator=generator) * 2 - 1).to(device, torch.float64))
    return tuple(hashes)


@dataclass
class AdapterNumbers:
    """What the second pass found for one adapter (CPU values)."""

    index: int
    loadings: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)  # float32 (r, K), (K, r)
    parts: dict[str, tuple[float, float]] = field(default_factory=dict)  # in-sample (residual, total) per layer
    random: list[float] = field(default_factory=lambda: [0.0, 0.0])
    loo: list[float] | None = None
    singular: dict[str, Tensor] = field(default_factory=dict)  # singular values of dW per layer (float64)
    sketch: Tensor | None = None  # (SKETCH_SIDE^2,) float64


def evaluate(block: list[tuple[int, Factors]], plans: dict[str, LayerPlan], loo_adapters: set[int], device: torch.device) -> list[AdapterNumbers]:
    """`AdapterNumbers` of every adapter in ``block`` ((index, factors) pairs); items of equal
    shape across adapters and layers are stacked into one batch each."""
    numbers = {index: AdapterNumbers(index) for index, _ in block}
    items = [(index, name, factors[name]) for index, factors in block for name in factors if name in plans]
    groups: dict[tuple, list] = {}
    for item in items:
        a, b = item[2]
        plan = plans[item[1]]
        groups.setdefault((tuple(a.shape), tuple(b.shape), plan.down.shape[0], plan.principal), []).append(item)
    for members in groups.values():
        _project_group(members, plans, numbers, device)
    loo_groups: dict[tuple, list] = {}
    for item in items:
        plan = plans[item[1]]
        if plan.loo is not None and item[0] in loo_adapters:
            key = (tuple(item[2][0].shape), tuple(item[2][1].shape), plan.loo[0].shape[1], plan.loo[2].shape[1], plan.principal)
            loo_groups.setdefault(key, []).append(item)
    for members in loo_groups.values():
        _loo_group(members, plans, numbers, device)
    for index in numbers:
        if index in loo_adapters and numbers[index].loo is None:
            numbers[index].loo = [0.0, 0.0]
    sketch_groups: dict[tuple, list] = {}
    for item in items:
        if plans[item[1]].sketch is not None:
            sketch_groups.setdefault((tuple(item[2][0].shape), tuple(item[2][1].shape)), []).append(item)
    for members in sketch_groups.values():
        _sketch_group(members, plans, numbers, device)
    return [numbers[index] for index, _ in block]


def _stack(members: list, device: torch.device) -> tuple[Tensor, Tensor]:
    return _stacked([m[2][0] for m in members], device), _stacked([m[2][1] for m in members], device)


def _stacked(tensors: list[Tensor], device: torch.device) -> Tensor:
    """float64 stack on ``device``: stacked where the factors are (one copy for host factors, none
    for factors the store left on the GPU); a mix is moved to the device first."""
    if len({t.device for t in tensors}) > 1:
        tensors = [t.to(device) for t in tensors]
    return torch.stack(tensors).to(device, torch.float64)


def _parts(gram_a: Tensor, gram_b: Tensor, alpha: Tensor, beta: Tensor) -> tuple[Tensor, Tensor]:
    """Squared residual and total norms (G,) from A A^T, B^T B (G, r, r) and loadings alpha (G, r, K), beta (G, K, r)."""
    fitted_b = beta.mT @ beta
    residual = ((gram_b - fitted_b) * gram_a).sum((-2, -1)) + (fitted_b * (gram_a - alpha @ alpha.mT)).sum((-2, -1))
    return residual.clamp_min(0.0), (gram_b * gram_a).sum((-2, -1))


def _explicit_parts(a: Tensor, b: Tensor, gram_a: Tensor, down: Tensor, up: Tensor, alpha: Tensor, beta: Tensor) -> tuple[Tensor, Tensor]:
    """`_parts` from the residual factors A - alpha V and B - U beta themselves: the stored float32
    components are orthonormal to ~1e-7 only, and a trace difference would lose small errors to that."""
    residual_a, fitted_b = a - alpha @ down, up @ beta
    residual_b = b - fitted_b
    residual = ((residual_b.mT @ residual_b) * gram_a).sum((-2, -1)) + ((fitted_b.mT @ fitted_b) * (residual_a @ residual_a.mT)).sum((-2, -1))
    return residual, ((b.mT @ b) * gram_a).sum((-2, -1))


def _project_group(members: list, plans: dict[str, LayerPlan], numbers: dict[int, AdapterNumbers], device: torch.device) -> None:
    a, b = _stack(members, device)
    layer_plans_ = [plans[m[1]] for m in members]
    down = torch.stack([p.down for p in layer_plans_])
    up = torch.stack([p.up for p in layer_plans_])
    gram_a, gram_b = a @ a.mT, b.mT @ b
    alpha, beta = a @ down.mT, up.mT @ b
    residual, total = _explicit_parts(a, b, gram_a, down, up, alpha, beta)
    random_down = torch.stack([p.random_down for p in layer_plans_])
    random_up = torch.stack([p.random_up for p in layer_plans_])
    random_residual, _ = _parts(gram_a, gram_b, a @ random_down.mT, random_up.mT @ b)
    singular = (a * a).sum(-1)  # balanced A = S^1/2 V^T: squared row norms are the singular values
    alpha, beta, singular = alpha.float().cpu(), beta.float().cpu(), singular.cpu()
    values = torch.stack([residual, total, random_residual]).cpu().tolist()
    for j, (index, name, _) in enumerate(members):
        found = numbers[index]
        found.loadings[name] = (alpha[j], beta[j])
        found.parts[name] = (values[0][j], values[1][j])
        found.random[0] += values[2][j]
        found.random[1] += values[1][j]
        found.singular[name] = singular[j]


def _top_directions(energies: Tensor, matrix: Tensor, k: int, full_top: Tensor) -> Tensor:
    """Top-``k`` eigenvectors (G, m, k) of symmetric ``matrix`` (G, m, m); directions that are
    rounding noise (below `RANK_TOLERANCE` of the top, or all of them when the downdated sum is
    empty against the full sum's top ``full_top``) are zeroed."""
    if matrix.shape[-1] == 0:  # the sums have no direction at all (an all-zero layer)
        return matrix.new_zeros(matrix.shape[0], 0, k)
    values, vectors = batched_eigh(matrix)
    values, vectors = values.flip(-1)[:, :k], vectors.flip(-1)[:, :, :k]
    top = values[:, :1]
    keep = (values > top * RANK_TOLERANCE) & (top > LOO_NOISE * full_top.unsqueeze(1))
    return vectors * keep.unsqueeze(1)


def _loo_group(members: list, plans: dict[str, LayerPlan], numbers: dict[int, AdapterNumbers], device: torch.device) -> None:
    a, b = _stack(members, device)
    bases = [plans[m[1]].loo for m in members]
    q_down, lam_down, q_up, lam_up = (torch.stack([basis[i] for basis in bases]) for i in range(4))
    k = plans[members[0][1]].principal
    c_down = a @ q_down  # (G, r, m)
    c_up = q_up.mT @ b  # (G, m', r)
    w_down = _top_directions(lam_down, torch.diag_embed(lam_down) - c_down.mT @ c_down, k, lam_down[:, :1].sum(1))
    w_up = _top_directions(lam_up, torch.diag_embed(lam_up) - c_up @ c_up.mT, k, lam_up[:, :1].sum(1))
    residual, total = _parts(a @ a.mT, b.mT @ b, c_down @ w_down, w_up.mT @ c_up)
    values = torch.stack([residual, total]).cpu().tolist()
    for j, (index, _, _) in enumerate(members):
        found = numbers[index]
        found.loo = found.loo or [0.0, 0.0]
        found.loo[0] += values[0][j]
        found.loo[1] += values[1][j]


def _sketch_group(members: list, plans: dict[str, LayerPlan], numbers: dict[int, AdapterNumbers], device: torch.device) -> None:
    """Y = (S_out B)(A S_in^T) per item, summed per adapter (CountSketch S_out (s, out), S_in (s, in))."""
    a, b = _stack(members, device)
    hashes = [plans[m[1]].sketch for m in members]
    hash_out, sign_out, hash_in, sign_in = (torch.stack([h[i] for h in hashes]) for i in range(4))
    count, rank = a.shape[0], a.shape[1]
    sketched_b = torch.zeros(count, SKETCH_SIDE, rank, dtype=torch.float64, device=device)
    sketched_b.scatter_add_(1, hash_out.unsqueeze(-1).expand(-1, -1, rank), b * sign_out.unsqueeze(-1))
    sketched_a = torch.zeros(count, rank, SKETCH_SIDE, dtype=torch.float64, device=device)
    sketched_a.scatter_add_(2, hash_in.unsqueeze(1).expand(-1, rank, -1), a * sign_in.unsqueeze(1))
    sketches = (sketched_b @ sketched_a).reshape(count, -1).cpu()
    for j, (index, _, _) in enumerate(members):
        found = numbers[index]
        found.sketch = sketches[j].clone() if found.sketch is None else found.sketch + sketches[j]


def blocks(count: int, sizes: list[int], budget: int = BLOCK_BYTES) -> list[range]:
    """Consecutive ranges of at most `BLOCK_ADAPTERS` adapters whose float64 factors (``sizes``
    numbers each) fit ``budget`` (an adapter larger than the budget gets a block of its own)."""
    result, start, held = [], 0, 0
    for index, size in enumerate(sizes):
        if index > start and (held + 8 * size > budget or index - start >= BLOCK_ADAPTERS):
            result.append(range(start, index))
            start, held = index, 0
        held += 8 * size
    if start < count:
        result.append(range(start, count))
    return result
