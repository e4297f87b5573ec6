"""Uni-LoRA: every LoRA parameter of the model comes from one trainable vector (METHODS.md).

theta_D = [A_1; B_1; ...; A_L; B_L] (length D) = P theta_d, with P (D x d) a fixed sparse random
matrix: each row has one non-zero, in a column drawn uniformly from a seeded generator, valued
1 / sqrt(n_j) where n_j counts the rows of column j; so P^T P = I (for every used column).
P is regenerated from the seed; only theta_d and the seed are saved. Conv layers are targeted as
linears on their flattened weight, like every family. Same math as peft's UniLoraConfig, behind
the studio's family protocol.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from studio.adapters.base import AdapterBase
from studio.adapters.layers import DEFAULT_TARGETS, in_features, select_layers
from studio.bases import ModuleTree
from studio.options import option

FAMILY = "unilora"


@dataclass(frozen=True)
class Config:
    """Uni-LoRA knobs: trainable length d, the projection seed, LoRA rank r and alpha, targets."""

    d: int = option(256, "length of the one trainable vector shared by all layers", minimum=1, maximum=100_000_000)
    seed: int = option(42, "seed of the fixed projection that spreads the vector over the layers", minimum=0)
    rank: int = option(4, "rank of the LoRA factors the projection fills", minimum=1, maximum=1024)
    alpha: float = option(4.0, "update scale alpha / rank", minimum=0, exclusive_minimum=True)
    init_bound: float = option(0.02, "the vector starts uniform in [-bound, bound] (B factors start at zero)", minimum=0)
    targets: tuple[str, ...] = option(DEFAULT_TARGETS, "module name suffixes or globs to adapt")
    components: tuple[str, ...] = option(("unet",), "pipeline components to adapt: unet, text_encoder, text_encoder_2")

    def __post_init__(self) -> None:
        if self.d < 1 or self.rank < 1:
            raise ValueError(f"d and rank must be >= 1, got d={self.d}, rank={self.rank}")


def projection_indices(total: int, d: int, seed: int) -> tuple[Tensor, Tensor]:
    """Column of each row of P and its value 1/sqrt(n_j), regenerated from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    columns = torch.randint(0, d, (total,), generator=generator)
    counts = torch.bincount(columns, minlength=d).clamp(min=1).float()
    return columns, counts[columns].rsqrt()


class TrainableUniLora(nn.Module, AdapterBase):
    """theta_d (trainable) and the fixed projection that spreads it over every A_l and B_l."""

    has_factors = True
    computes_layers_together = True

    def __init__(self, config: Config, shapes: dict[str, tuple[int, ...]]):
        super().__init__()
        self.config = config
        self.scale = config.alpha / config.rank
        self._layers = list(shapes)
        self._slices: dict[str, tuple[int, int, int, int]] = {}
        offset = 0
        for layer, shape in shapes.items():
            a_size, b_size = config.rank * in_features(shape), shape[0] * config.rank
            self._slices[layer] = (offset, a_size, b_size, shape[0])
            offset += a_size + b_size
        self.total = offset
        columns, values = projection_indices(offset, config.d, config.seed)
        self.register_buffer("columns", columns, persistent=False)
        self.register_buffer("values", values, persistent=False)
        generator = torch.Generator().manual_seed(config.seed + 1)
        theta = (torch.rand(config.d, generator=generator) * 2 - 1) * config.init_bound
        self.theta_d = nn.Parameter(theta)

    def layers(self) -> list[str]:
        return list(self._layers)

    def projection(self) -> Tensor:
        """P as a sparse (D x d) matrix, for inspection and tests."""
        rows = torch.arange(self.total, device=self.columns.device)
        return torch.sparse_coo_tensor(torch.stack([rows, self.columns]), self.values, (self.total, self.config.d))

    def theta_full(self) -> Tensor:
        """theta_D = P theta_d: a gather and a scale."""
        return self.theta_d[self.columns] * self.values

    def _split(self, theta: Tensor, layer: str) -> tuple[Tensor, Tensor]:
        start, a_size, b_size, out = self._slices[layer]
        down = theta[start:start + a_size].reshape(self.config.rank, -1)
        up = theta[start + a_size:start + a_size + b_size].reshape(out, self.config.rank)
        return down, up * self.scale

    def all_factors(self) -> dict[str, tuple[Tensor, Tensor]]:
        """Every layer's (down, up), from one projection of theta_d."""
        theta = self.theta_full()
        return {layer: self._split(theta, layer) for layer in self._layers}

    def factors(self, layer: str) -> tuple[Tensor, Tensor]:
        return self._split(self.theta_full(), layer)

    def delta(self, layer: str) -> Tensor:
        down, up = self.factors(layer)
        return up @ down


def build(config: Config, tree: ModuleTree) -> TrainableUniLora:
    """A fresh Uni-LoRA over the layers of ``tree`` that match ``config.targets``."""
    layers = select_layers(tree, config.targets, config.components)
    return TrainableUniLora(config, {layer: tree.modules[layer].weight_shape for layer in layers})
