"""Export any trained adapter as a standard LoRA (``LoraAdapter``), exactly or by truncated SVD.

Adapters that answer ``factors(layer)`` (lora, eigenlora, unilora) export exactly when the
requested rank is at least their own; otherwise each dW is truncated by SVD at the chosen rank
and the relative error ||dW - dW_r||_F / ||dW||_F is reported (per layer and overall).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from studio.adapters.base import capabilities
from studio.adapters.lora import LoraAdapter, LoraLayer
from studio.bases import ModuleTree


@dataclass
class Export:
    """The exported LoRA and how faithful it is."""

    adapter: LoraAdapter
    exact: bool
    relative_error: float
    layer_errors: dict[str, float] = field(default_factory=dict)


def _svd_factors(delta: Tensor, rank: int) -> tuple[Tensor, Tensor, float, float]:
    """Balanced truncated factors (down, up) of delta, and the squared norms of error and delta."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    r = max(1, min(rank, int(s.numel())))
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


@torch.no_grad()
def to_lora(adapter: Any, rank: int = 0, name: str = "adapter", tree: ModuleTree | None = None,
            metadata: dict[str, str] | None = None) -> Export:
    """Export ``adapter`` as a LoraAdapter; ``rank`` 0 means the adapter's own rank (exact when factored)."""
    caps = capabilities(adapter)
    factored = caps.factors
    bulk = adapter.all_factors() if factored and caps.layers_together else None
    deltas = adapter.deltas() if not factored and caps.layers_together else None
    layers, errors, err_sum, total_sum, exact = {}, {}, 0.0, 0.0, True
    for layer in adapter.layers():
        shape = tree.modules[layer].weight_shape if tree is not None and layer in tree.modules else None
        if factored:
            down, up = bulk[layer] if bulk is not None else adapter.factors(layer)
            if rank == 0 or down.shape[0] <= rank:
                layers[layer] = _layer(down.float(), up.float(), shape)
                errors[layer] = 0.0
                continue
            delta = up.float() @ down.float()
        else:
            delta = (deltas[layer] if deltas is not None else adapter.delta(layer)).float()
        down, up, err, total = _svd_factors(delta, rank or 16)
        exact = False
        layers[layer] = _layer(down, up, shape)
        errors[layer] = (err / total) ** 0.5 if total > 0 else 0.0
        err_sum, total_sum = err_sum + err, total_sum + total
    overall = (err_sum / total_sum) ** 0.5 if total_sum > 0 else 0.0
    notes = [] if exact else [f"exported by truncated SVD at rank {rank or 16}: relative error {overall:.4f}"]
    meta = dict(metadata or {})
    meta["studio_export_relative_error"] = f"{overall:.6g}"
    lora = LoraAdapter(name, layers, meta, "studio", notes, tree.arch if tree is not None else "")
    return Export(lora, exact, overall, errors)
