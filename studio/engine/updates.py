"""Per-layer weight updates prepared on the device, and the one kernel that merges them.

An adapter's update of a layer is kept either as a dense matrix dW (out, in_flat) or as its
factors (down (r, in_flat), up (out, r)). Merging writes ``W = W0 + s * dW`` in one kernel:
``torch.add(W0, dW, alpha=s, out=W)`` for dense updates, ``torch.addmm(W0, up, down, alpha=s,
out=W)`` for factors (which reads less memory than a dense dW when r is small). Always starting
from the pristine ``W0`` is what makes switching drift-free and bit-reproducible.

Pure tensor code: device and dtype are chosen by the caller.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from studio.adapters.base import Adapter

MergeFrom = Literal["auto", "dense", "factors"]


@dataclass(frozen=True)
class LayerUpdate:
    """dW of one layer at strength 1, as a dense matrix or as factors ``up @ down``."""

    dense: Tensor | None = None
    down: Tensor | None = None
    up: Tensor | None = None

    @property
    def nbytes(self) -> int:
        tensors = (self.dense, self.down, self.up)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def matrix(self) -> Tensor:
        """The dense dW (materialised for factors)."""
        if self.dense is not None:
            return self.dense
        return self.up @ self.down

    def write(self, pristine: Tensor, out: Tensor, weight: float) -> None:
        """``out = pristine + weight * dW`` in one kernel (out is the live 2-D weight view)."""
        if self.dense is not None:
            torch.add(pristine, self.dense, alpha=weight, out=out)
        else:
            torch.addmm(pristine, self.up, self.down, alpha=weight, out=out)

    def accumulate(self, out: Tensor, weight: float) -> None:
        """``out += weight * dW`` (second and later terms of a mix)."""
        if self.dense is not None:
            out.add_(self.dense, alpha=weight)
        else:
            out.addmm_(self.up, self.down, alpha=weight)


def prepare_layer(adapter: Adapter, layer: str, shape: tuple[int, int], merge_from: MergeFrom,
                  device: torch.device, dtype: torch.dtype) -> LayerUpdate:
    """One layer's update on ``device`` in ``dtype``, checked against the 2-D weight ``shape``.

    ``auto`` keeps factors when the adapter has them and they are less than half the size of dW.
    """
    if merge_from != "dense" and hasattr(adapter, "factors"):
        down, up = adapter.factors(layer)
        rank = int(down.shape[0])
        if merge_from == "factors" or _factors_are_cheaper(rank, shape):
            down, up = down.reshape(rank, -1), up.reshape(-1, rank)
            _check_shape(layer, (up.shape[0], down.shape[1]), shape)
            return LayerUpdate(down=_on(down, device, dtype), up=_on(up, device, dtype))
    dense = adapter.delta(layer)
    if dense.numel() != shape[0] * shape[1]:
        _check_shape(layer, tuple(dense.shape), shape)
    return LayerUpdate(dense=_on(dense.reshape(shape), device, dtype))


def _factors_are_cheaper(rank: int, shape: tuple[int, int]) -> bool:
    return rank * (shape[0] + shape[1]) * 2 <= shape[0] * shape[1]


def _on(tensor: Tensor, device: torch.device, dtype: torch.dtype) -> Tensor:
    """A contiguous copy on the device (never aliasing the adapter's own tensors)."""
    return tensor.detach().to(device=device, dtype=dtype, copy=True).contiguous()


def _check_shape(layer: str, got: tuple[int, ...], want: tuple[int, int]) -> None:
    from studio.errors import KeyMismatchError

    if tuple(got) != tuple(want):
        raise KeyMismatchError(f"layer {layer}: the adapter's update has shape {tuple(got)}, the pipeline's weight is {tuple(want)}")
