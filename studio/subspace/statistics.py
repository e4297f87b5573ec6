"""Per-layer statistics for streaming extraction: bounded memory, exact results.

Each layer takes one of two routes, chosen when the layer is first seen from the expected number
of stacked rows M = N * r (N adapters of rank r) against the layer's width:

- ``gram``: while M <= max(in, out) (and M <= `GRAM_MAX_ROWS`), the canonical factors themselves
  are kept (M x in and out x M: less than a d x d sum) and the directions come from the M x M Gram
  matrices of the stacked factors. The same Grams give every pair of adapters' update inner
  products <dW_i, dW_j> exactly (near-duplicates, the mean-adapter baseline).
- ``covariance``: otherwise the sums  sum_i A_i^T A_i (in x in) and sum_i B_i B_i^T (out x out)
  are accumulated (memory independent of N) and eigendecomposed at the end; ranks of
  torch.distributed each sum their shard and the sums are all-reduced (distributed runs always
  take this route).

Both routes give the same directions (eigenvectors of the same sums) up to float rounding.
"""

from __future__ import annotations

import math

from dataclasses import dataclass, field
from typing import Literal, Sequence

import torch
from torch import Tensor

from studio.adapters.lora import LoraLayer
from studio.errors import StudioError
from studio.subspace.canonical import canonical_batch
from studio.subspace.collection import LayerShape
from studio.subspace.distributed import all_gather_json, all_reduce_sum
from studio.subspace.extract import (
    Directions, LayerSubspace, SubspaceSpec, build_subspace, chunks, directions_from_covariances, directions_from_grams, layer_seed,
)

GRAM_MAX_ROWS = 4096  # stacked rows above which a layer sums d x d covariances instead (Gram eigh cost ~ M^3)
# Numbers per float64 stack when fitting (gram layers: stacked factors, Grams and directions are each
# about this size; covariance layers: the stacked sums, their eigenvectors and the flipped copy):
# 128 MiB on a CPU, where peak memory is the target; 512 MiB on a GPU.
GRAM_BATCH = {"cpu": 1 << 24, "cuda": 1 << 26}
Route = Literal["gram", "covariance"]
Factors = dict[str, tuple[Tensor, Tensor]]


def canonical_factors(layer: LoraLayer, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """Balanced ``(A, B)`` of a LoRA layer (scale alpha / r folded in), on ``device``."""
    return canonical_layers([layer], device)[0]


def canonical_layers(layers: Sequence[LoraLayer], device: torch.device | str = "cpu") -> list[tuple[Tensor, Tensor]]:
    """`canonical_factors` of many layers, in order: layers of equal shape (rank, in, out) and
    dtype go through one batched `canonical_batch` (in chunks of at most `BATCH_ELEMENTS` numbers).
    The stored factors are stacked as they are (often float16) and moved to ``device`` in one copy
    per chunk; casting and the alpha / r scale happen there (on a GPU, host-side casts of thousands
    of small tensors cost more than the whole decomposition)."""
    groups: dict[tuple, list[int]] = {}
    for index, layer in enumerate(layers):
        groups.setdefault((layer.rank, math.prod(layer.down.shape[1:]), int(layer.up.shape[0]), layer.down.dtype, layer.up.dtype), []).append(index)
    result: list = [None] * len(layers)
    for (rank, in_size, out_features, _, _), members in groups.items():
        for part in chunks(len(members), 2 * rank * (in_size + out_features)):
            indices = [members[j] for j in part]
            downs = torch.stack([layers[i].down.reshape(rank, in_size) for i in indices]).to(device)
            ups = torch.stack([layers[i].up.reshape(out_features, rank) for i in indices]).to(device)
            scales = torch.tensor([layers[i].scale for i in indices], dtype=torch.float64, device=device)
            new_downs, new_ups = canonical_batch(downs, ups, scales)
            for j, i in enumerate(indices):
                result[i] = (new_downs[j], new_ups[j])
    return result


def check_shape(shapes: dict[str, LayerShape], layer: str, shape: LayerShape, adapter: str) -> None:
    """Record a layer's shape, or refuse an adapter whose layer shape differs from the others'."""
    known = shapes.setdefault(layer, shape)
    if known != shape:
        raise StudioError(
            f"adapter {adapter!r}: layer {layer!r} has shape in={shape.in_features} out={shape.out_features} "
            f"{shape.down_tail}, the collection has in={known.in_features} out={known.out_features} {known.down_tail} "
            "(adapters for different base models cannot share a subspace)"
        )


@dataclass
class LayerStatistics:
    """One layer's statistics: kept factors (gram route) or summed covariances, and who has it."""

    route: Route
    members: list[int] = field(default_factory=list)  # adapter indices having the layer, in order added
    position: dict[int, int] = field(default_factory=dict)  # adapter index -> its place in members
    ranks: list[int] = field(default_factory=list)
    downs: list[Tensor] = field(default_factory=list)  # gram route: canonical A (r, in) per member
    ups: list[Tensor] = field(default_factory=list)  # gram route: canonical B (out, r) per member
    down_covariance: Tensor | None = None
    up_covariance: Tensor | None = None
    count: int = 0  # stacked rows (sum of ranks)


@dataclass
class FittedLayer:
    """A layer's components plus what the report needs: all directions and energies of both sides
    (leave-one-out), and for gram layers the members' exact update inner products."""

    subspace: LayerSubspace
    down: Directions
    up: Directions
    route: Route
    members: list[int]
    pair_products: Tensor | None = None  # (n, n) float64 <dW_i, dW_j> over `members` (gram route)


class CollectionStatistics:
    """Streaming accumulator: `add` one adapter's canonical factors at a time, `all_reduce` across
    ranks, then `fit` the components. ``expected`` is the number of adapters of the whole run
    (all ranks): with ``gram`` False (distributed runs) every layer sums covariances."""

    def __init__(self, expected: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float64, gram: bool = True) -> None:
        self.expected = expected
        self.device = torch.device(device)
        self.dtype = dtype
        self.gram = gram
        self.layers: dict[str, LayerStatistics] = {}
        self.shapes: dict[str, LayerShape] = {}
        self._blocks: dict[tuple[str, str], tuple[Tensor, int]] = {}  # (side, layer) -> (block of sums, place in it)

    def _route(self, name: str, rank: int) -> Route:
        shape = self.shapes[name]
        rows = self.expected * rank
        return "gram" if self.gram and rows <= min(max(shape.in_features, shape.out_features), GRAM_MAX_ROWS) else "covariance"

    def _layer(self, name: str, rank: int) -> LayerStatistics:
        if name not in self.layers:
            self.layers[name] = LayerStatistics(self._route(name, rank))
            if self.layers[name].route == "covariance":
                self._allocate([name])
        return self.layers[name]

    def _allocate(self, names: list[str]) -> None:
        """Zero sums for new covariance-route layers: per side, one (L, d, d) block for the layers
        of one size, each layer's sum a view of it (`add` sums an adapter's layers of a block with
        one batched product instead of a few small operations per layer)."""
        for side, size in (("down", lambda shape: shape.in_features), ("up", lambda shape: shape.out_features)):
            groups: dict[int, list[str]] = {}
            for name in names:
                groups.setdefault(size(self.shapes[name]), []).append(name)
            for dim, members in groups.items():
                block = torch.zeros(len(members), dim, dim, dtype=self.dtype, device=self.device)
                for j, name in enumerate(members):
                    setattr(self.layers[name], f"{side}_covariance", block[j])
                    self._blocks[(side, name)] = (block, j)

    def add(self, index: int, factors: Factors) -> Factors:
        """Accumulate adapter ``index``'s canonical factors (float32, on the device); the gram
        route keeps references to them (`kept`), the covariance route only their sums. Returns the
        factors of the covariance-route layers (the caller keeps those for the second pass)."""
        new = [name for name in factors if name not in self.layers]
        for name in new:
            self.layers[name] = LayerStatistics(self._route(name, factors[name][0].shape[0]))
        self._allocate([name for name in new if self.layers[name].route == "covariance"])
        summed = {}
        for name, (down, up) in factors.items():
            stats = self.layers[name]
            stats.position[index] = len(stats.members)
            stats.members.append(index)
            stats.ranks.append(down.shape[0])
            stats.count += down.shape[0]
            if stats.route == "gram":
                stats.downs.append(down)
                stats.ups.append(up)
            else:
                summed[name] = (down, up)
        self._accumulate("down", {name: pair[0].T for name, pair in summed.items()})
        self._accumulate("up", {name: pair[1] for name, pair in summed.items()})
        return summed

    def _accumulate(self, side: str, columns: dict[str, Tensor]) -> None:
        """Add C C^T to each named layer's ``side`` sum (C: (d, r) columns): layers at consecutive
        places of one block with one rank take one batched product (baddbmm) together."""
        runs: list[tuple[Tensor, int, list[Tensor]]] = []
        for name, matrix in sorted(columns.items(), key=lambda item: (id(self._blocks[(side, item[0])][0]), self._blocks[(side, item[0])][1])):
            block, place = self._blocks[(side, name)]
            last = runs[-1] if runs else None
            if last is not None and last[0] is block and last[1] + len(last[2]) == place and last[2][0].shape == matrix.shape:
                last[2].append(matrix)
            else:
                runs.append((block, place, [matrix]))
        for block, start, matrices in runs:
            stacked = torch.stack(matrices).to(self.dtype)
            block[start : start + len(matrices)].baddbmm_(stacked, stacked.mT)

    def kept(self, index: int) -> Factors:
        """Adapter ``index``'s factors on the gram-route layers (device tensors, as added)."""
        found = {}
        for name, stats in self.layers.items():
            if stats.route == "gram" and stats.downs:
                position = stats.position.get(index)
                if position is not None:
                    found[name] = (stats.downs[position], stats.ups[position])
        return found

    def release(self) -> None:
        """Drop the kept factors and the sums (after the second pass)."""
        for stats in self.layers.values():
            stats.downs, stats.ups, stats.down_covariance, stats.up_covariance = [], [], None, None
        self._blocks = {}

    def all_reduce(self, group=None) -> None:
        """Sum the statistics of every rank (layers seen by any rank), layers in sorted order.
        Only the covariance route can be reduced (distributed runs use nothing else)."""
        gathered = all_gather_json({name: [s.in_features, s.out_features, list(s.down_tail), list(s.up_tail)] for name, s in self.shapes.items()}, group)
        for rank_shapes in gathered:
            for name, (n_in, n_out, down_tail, up_tail) in rank_shapes.items():
                check_shape(self.shapes, name, LayerShape(n_in, n_out, tuple(down_tail), tuple(up_tail)), f"(another rank's adapter with layer {name})")
        self.shapes = {name: self.shapes[name] for name in sorted(self.shapes)}
        members = all_gather_json({name: s.members for name, s in self.layers.items()}, group)
        for name in self.shapes:
            stats = self._layer(name, 1)
            if stats.route == "covariance":
                all_reduce_sum(stats.down_covariance, group)
                all_reduce_sum(stats.up_covariance, group)
                stats.count = int(all_reduce_sum(torch.tensor([stats.count], dtype=torch.float64), group).item())
                stats.members = sorted(i for rank_members in members for i in rank_members.get(name, []))
        self.layers = {name: self.layers[name] for name in self.shapes}

    def fit(self, spec: SubspaceSpec, limit: int | None = None) -> dict[str, FittedLayer]:
        """Components of every layer (sorted by name) with their directions; K clamping is left to
        the caller to report. Gram layers of equal (M, in, out) and covariances of equal size go
        through batched eighs (in chunks of `BATCH_ELEMENTS`). The sums are released; kept factors
        stay for the second pass (`kept`, then `release`). ``limit``: the leading directions per side
        the caller uses (`evaluate.directions_needed`); fewer are formed, the same numbers."""
        names = sorted(self.layers)
        found: dict[str, tuple[Directions, Directions, Tensor | None]] = {}
        found.update(self._fit_grams([n for n in names if self.layers[n].route == "gram"], limit))
        found.update(self._fit_covariances([n for n in names if self.layers[n].route == "covariance"], limit))
        fitted = {}
        for name in names:
            down, up, products = found[name]
            shape, stats = self.shapes[name], self.layers[name]
            subspace = build_subspace(down, up, spec, layer_seed(spec.seed, name), shape.in_features, shape.out_features)
            fitted[name] = FittedLayer(subspace, down, up, stats.route, list(stats.members), products)
            stats.down_covariance, stats.up_covariance = None, None
        self._blocks = {}  # the sums' blocks go with their last views
        return fitted

    def _fit_grams(self, names: list[str], limit: int | None = None) -> dict[str, tuple[Directions, Directions, Tensor]]:
        groups: dict[tuple[int, int, int, tuple[int, ...]], list[str]] = {}
        for name in names:
            stats, shape = self.layers[name], self.shapes[name]
            groups.setdefault((stats.count, shape.in_features, shape.out_features, tuple(stats.ranks)), []).append(name)
        result = {}
        for (count, n_in, n_out, ranks), members in groups.items():
            owner = _owner_matrix(list(ranks), self.device)
            for part in chunks(len(members), 2 * count * (n_in + n_out + count), GRAM_BATCH.get(self.device.type, 1 << 24)):
                batch = [members[j] for j in part]
                downs = torch.stack([torch.cat(self.layers[n].downs) for n in batch]).double()  # (L, M, in)
                ups = torch.stack([torch.cat(self.layers[n].ups, dim=1).T for n in batch]).double()  # (L, M, out)
                down_grams, up_grams = downs @ downs.mT, ups @ ups.mT
                products = owner.T @ (down_grams * up_grams) @ owner  # (L, n, n): <dW_i, dW_j>
                for name, d, u, p in zip(batch, directions_from_grams(downs, down_grams, limit), directions_from_grams(ups, up_grams, limit), products):
                    result[name] = (d, u, p)
        return result

    def _fit_covariances(self, names: list[str], limit: int | None = None) -> dict[str, tuple[Directions, Directions, None]]:
        down = self._directions(names, lambda s: s.down_covariance, limit)
        up = self._directions(names, lambda s: s.up_covariance, limit)
        return {name: (down[name], up[name], None) for name in names}

    def _directions(self, names: list[str], side, limit: int | None = None) -> dict[str, Directions]:
        """Directions of one side (``side(stats)`` is its covariance) of every named layer."""
        groups: dict[int, list[str]] = {}
        for name in names:
            groups.setdefault(side(self.layers[name]).shape[0], []).append(name)
        result = {}
        for dim, members in groups.items():
            for part in chunks(len(members), dim * dim, GRAM_BATCH.get(self.device.type, 1 << 24)):
                batch = [members[j] for j in part]
                stacked = torch.stack([side(self.layers[n]) for n in batch])
                for name, found in zip(batch, directions_from_covariances(stacked, [self.layers[n].count for n in batch], limit)):
                    result[name] = found
        return result

    def nbytes(self) -> int:
        """Bytes held by the statistics (for memory reports and tests)."""
        total = 0
        for s in self.layers.values():
            total += sum(t.nbytes for t in s.downs) + sum(t.nbytes for t in s.ups)
            total += sum(t.nbytes for t in (s.down_covariance, s.up_covariance) if t is not None)
        return total


def _owner_matrix(ranks: list[int], device: torch.device) -> Tensor:
    """(M, n) float64 indicator: row p of the stacked factors belongs to member j."""
    owner = torch.zeros(sum(ranks), len(ranks), dtype=torch.float64, device=device)
    start = 0
    for j, rank in enumerate(ranks):
        owner[start : start + rank, j] = 1.0
        start += rank
    return owner
