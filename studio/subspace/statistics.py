"""Per-layer statistics for streaming extraction: memory independent of the number of adapters.

For each layer, the sums  sum_i A_i^T A_i  (in x in) and  sum_i B_i B_i^T  (out x out) of the
canonical factors hold everything the principal directions need (their eigenvectors are the
right / left singular vectors of the stacked matrices). Adapters are added one at a time and
dropped; ranks of torch.distributed each sum their shard and the sums are all-reduced.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from studio.adapters.lora import LoraAdapter, LoraLayer
from studio.errors import StudioError
from studio.subspace.canonical import canonical
from studio.subspace.collection import LayerShape
from studio.subspace.distributed import all_gather_json, all_reduce_sum
from studio.subspace.extract import LayerSubspace, SubspaceSpec, build_subspace, directions_from_covariance, layer_seed


def canonical_factors(layer: LoraLayer, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """Balanced ``(A, B)`` of a LoRA layer (scale alpha / r folded in), on ``device``."""
    down, up = layer.factors()
    return canonical(down.to(device), up.to(device))


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
            down, up = canonical_factors(lora_layer, self.device)
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
        """Components of every layer from the (reduced) sums; K clamping is left to the caller to report."""
        result = {}
        for name in sorted(self.layers):
            stats, shape = self.layers[name], self.shapes[name]
            down = directions_from_covariance(stats.down_covariance, stats.count)
            up = directions_from_covariance(stats.up_covariance, stats.count)
            result[name] = build_subspace(down, up, spec, layer_seed(spec.seed, name), shape.in_features, shape.out_features)
        return result

    def nbytes(self) -> int:
        """Bytes held by the statistics (for memory reports and tests)."""
        return sum(s.down_covariance.nbytes + s.up_covariance.nbytes for s in self.layers.values())
