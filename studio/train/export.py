"""Export any trained adapter as a standard LoRA (``LoraAdapter``), exactly or at the rank an error target needs.

Adapters that answer ``factors(layer)`` (lora, eigenlora, unilora) export exactly when the
requested rank is at least their own. Others (SuperLoRA, or a rank below the adapter's own) go
through an SVD of each dW; the rank is the requested one, or (rank 0) per layer the smallest rank
whose relative error ||dW - dW_r||_F / ||dW||_F is at most 1% (``TARGET``), up to ``max_rank``
(default: the full rank of the layer, which is exact). The error is always stated; above 1% it
is a warning with the number (``Export.message``). The native adapter file is written by the
training loop beside the export and is never replaced by it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from studio.adapters.base import capabilities
from studio.adapters.lora import LoraAdapter, LoraLayer
from studio.bases import ModuleTree
from studio.events import Message
from studio.formats.lycoris import rank_for

TARGET = 0.01


@dataclass
class Export:
    """The exported LoRA and how faithful it is."""

    adapter: LoraAdapter
    exact: bool
    relative_error: float
    layer_errors: dict[str, float] = field(default_factory=dict)
    ranks: list[int] = field(default_factory=list)  # distinct ranks written

    @property
    def how(self) -> str:
        """``exactly`` or the SVD's ranks and overall relative error."""
        if self.exact:
            return "exactly"
        ranks = f"rank {self.ranks[0]}" if len(self.ranks) == 1 else f"ranks {self.ranks[0]}-{self.ranks[-1]}"
        worst = max(self.layer_errors.values(), default=0.0)
        return f"by SVD at {ranks}, relative error {self.relative_error:.4f} (worst layer {worst:.4f})"

    def message(self, what: str = "a standard LoRA") -> Message:
        """The user-facing line: a warning with the number when the export error is above 1%."""
        if self.relative_error > TARGET:
            return Message(f"exported as {what} {self.how}: above the {TARGET:.0%} target, the LoRA does not "
                           "reproduce the adapter; the native adapter file is the faithful one", "warning")
        return Message(f"exported as {what} {self.how}")


def _svd_factors(delta: Tensor, rank: int, max_rank: int | None) -> tuple[Tensor, Tensor, float, float]:
    """Balanced truncated factors (down, up) of delta at ``rank`` (0: by the 1% target), squared error and norm."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    cap = int(s.numel()) if max_rank is None else max(1, min(max_rank, int(s.numel())))
    r = rank_for(s, TARGET, cap) if rank == 0 else max(1, min(rank, int(s.numel())))
    root = s[:r].sqrt()
    up, down = u[:, :r] * root, root[:, None] * vh[:r]
    total = float((s**2).sum())
    return down.float(), up.float(), float((s[r:] ** 2).sum()), total


def _layer(down: Tensor, up: Tensor, weight_shape: tuple[int, ...] | None) -> LoraLayer:
    """A LoraLayer with alpha = rank (scale 1), conv factors in their native 4-D shapes."""
    rank = down.shape[0]
    if weight_shape is not None and len(weight_shape) == 4:
        down = down.reshape(rank, *weight_shape[1:])
        up = up.reshape(up.shape[0], rank, 1, 1)
    return LoraLayer(down.detach().float().contiguous(), up.detach().float().contiguous(), float(rank))


def _sources(adapter: Any) -> tuple[bool, dict | None, dict | None]:
    """(factored, every layer's factors, every layer's dW): the bulk forms where the family
    computes its layers together (as it declares), else None (ask layer by layer)."""
    caps = capabilities(adapter)
    bulk = adapter.all_factors() if caps.factors and caps.layers_together else None
    deltas = adapter.deltas() if not caps.factors and caps.layers_together else None
    return caps.factors, bulk, deltas


@torch.no_grad()
def to_lora(adapter: Any, rank: int = 0, name: str = "adapter", tree: ModuleTree | None = None,
            metadata: dict[str, str] | None = None, max_rank: int | None = None) -> Export:
    """Export ``adapter`` as a LoraAdapter.

    ``rank`` 0 keeps a factored adapter's own rank (exact) and gives any other the rank the 1%
    error target needs per layer (at most ``max_rank``, default the layer's full rank); a
    positive ``rank`` truncates to that rank and states the error.
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
        raise ValueError(f"export rank must be 0 (automatic) or a positive integer, not {rank!r}")
    factored, bulk, deltas = _sources(adapter)
    layers, errors, err_sum, total_sum, exact = {}, {}, 0.0, 0.0, True
    for layer in adapter.layers():
        shape = tree.modules[layer].weight_shape if tree is not None and layer in tree.modules else None
        if factored:
            down, up = bulk[layer] if bulk is not None else adapter.factors(layer)
            if rank == 0 or down.shape[0] <= rank:
                layers[layer], errors[layer] = _layer(down.float(), up.float(), shape), 0.0
                continue
            delta = up.float() @ down.float()
        else:
            delta = (deltas[layer] if deltas is not None else adapter.delta(layer)).float()
        down, up, err, total = _svd_factors(delta, rank, max_rank)
        exact = False
        layers[layer] = _layer(down, up, shape)
        errors[layer] = (err / total) ** 0.5 if total > 0 else 0.0
        err_sum, total_sum = err_sum + err, total_sum + total
    overall = (err_sum / total_sum) ** 0.5 if total_sum > 0 else 0.0
    ranks = sorted({layer.rank for layer in layers.values()})
    result = Export(LoraAdapter(name, layers, dict(metadata or {}), "studio", [], tree.arch if tree is not None else ""),
                    exact, overall, errors, ranks)
    result.adapter.metadata["studio_export_relative_error"] = f"{overall:.6g}"
    if not exact:
        text = result.message().text
        result.adapter.notes.append(f"warning: {text}" if overall > TARGET else text)
    return result
