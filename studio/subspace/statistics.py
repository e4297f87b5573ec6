"""Per-layer statistics for streaming extraction: memory independent of the number of adapters.

For each layer, the sums  sum_i A_i^T A_i  (in x in) and  sum_i B_i B_i^T  (out x out) of the
canonical factors hold everything the principal directions need (their eigenvectors are the
right / left singular vectors of the stacked matrices). Adapters are added one at a time and
dropped; ranks of torch.distributed each sum their shard and the sums are all-reduced.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from studio.adapters.lora import LoraAdapter, LoraLayer
from studio.errors import StudioError
from studio.subspace.canonical import canonical_batch
from studio.subspace.collection import LayerShape
from studio.subspace.distributed import all_gather_json, all_reduce_sum
from studio.subspace.extract import Directions, LayerSubspace, SubspaceSpec, build_subspace, chunks, directions_from_covariances, layer_seed


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
        groups.setdefault((layer.rank, layer.down[0].numel(), layer.out_features, layer.down.dtype, layer.up.dtype), []).append(index)
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
    """Sums of A^T A and B B^T over the adapters having this layer, and how many rows (sum of r)."""

    down_covariance: Tensor
    up_covariance: Tensor
    count: int = 0


class CollectionStatistics:
    """Streaming accumulator: `add` one adapter at a time, `all_reduce` across ranks, `subspaces`."""

    def __init__(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float64) -> None:
        self.device = torch.device(device)
        self.dtype = dtype
        self.layers: dict[str, LayerStatistics] = {}
        self.shapes: dict[str, LayerShape] = {}

    def _layer(self, name: str) -> LayerStatistics:
        if name not in self.layers:
            shape = self.shapes[name]
            self.layers[name] = LayerStatistics(
                torch.zeros(shape.in_features, shape.in_features, dtype=self.dtype, device=self.device),
                torch.zeros(shape.out_features, shape.out_features, dtype=self.dtype, device=self.device),
            )
        return self.layers[name]

    def add(self, adapter: LoraAdapter) -> None:
        """Accumulate one adapter's canonical factors (the adapter can be dropped afterwards)."""
        for name, lora_layer in adapter.lora_layers.items():
            check_shape(self.shapes, name, LayerShape.of(lora_layer), adapter.name)
        canonicals = canonical_layers(list(adapter.lora_layers.values()), self.device)
        for name, (down, up) in zip(adapter.lora_layers, canonicals):
            stats = self._layer(name)
            stats.down_covariance.addmm_(down.T.to(self.dtype), down.to(self.dtype))
            stats.up_covariance.addmm_(up.to(self.dtype), up.T.to(self.dtype))
            stats.count += down.shape[0]

    def all_reduce(self, group=None) -> None:
        """Sum the statistics of every rank (layers seen by any rank), layers in sorted order."""
        gathered = all_gather_json({name: [s.in_features, s.out_features, list(s.down_tail), list(s.up_tail)] for name, s in self.shapes.items()}, group)
        for rank_shapes in gathered:
            for name, (n_in, n_out, down_tail, up_tail) in rank_shapes.items():
                check_shape(self.shapes, name, LayerShape(n_in, n_out, tuple(down_tail), tuple(up_tail)), f"(another rank's adapter with layer {name})")
        self.shapes = {name: self.shapes[name] for name in sorted(self.shapes)}
        reduced = {}
        for name in self.shapes:
            stats = self._layer(name)
            all_reduce_sum(stats.down_covariance, group)
            all_reduce_sum(stats.up_covariance, group)
            count = all_reduce_sum(torch.tensor([stats.count], dtype=torch.float64), group)
            reduced[name] = LayerStatistics(stats.down_covariance, stats.up_covariance, int(count.item()))
        self.layers = reduced

    def subspaces(self, spec: SubspaceSpec) -> dict[str, LayerSubspace]:
        """Components of every layer from the (reduced) sums; K clamping is left to the caller to report.

        Covariances of equal size go through one batched eigh (in chunks of `BATCH_ELEMENTS`)."""
        names = sorted(self.layers)
        down = self._directions(names, lambda s: s.down_covariance)
        up = self._directions(names, lambda s: s.up_covariance)
        return {
            name: build_subspace(down[name], up[name], spec, layer_seed(spec.seed, name), self.shapes[name].in_features, self.shapes[name].out_features)
            for name in names
        }

    def _directions(self, names: list[str], side) -> dict[str, Directions]:
        """Directions of one side (``side(stats)`` is its covariance) of every named layer."""
        groups: dict[int, list[str]] = {}
        for name in names:
            groups.setdefault(side(self.layers[name]).shape[0], []).append(name)
        result = {}
        for dim, members in groups.items():
            for part in chunks(len(members), dim * dim):
                batch = [members[j] for j in part]
                stacked = torch.stack([side(self.layers[n]) for n in batch])
                for name, found in zip(batch, directions_from_covariances(stacked, [self.layers[n].count for n in batch])):
                    result[name] = found
        return result

    def nbytes(self) -> int:
        """Bytes held by the statistics (for memory reports and tests)."""
        return sum(s.down_covariance.nbytes + s.up_covariance.nbytes for s in self.layers.values())
