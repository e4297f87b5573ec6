"""SuperLoRA: one parametrisation of LoRA variants across all layers at once (METHODS.md).

dW_all = [vec(dW_1); ...; vec(dW_L)] (length D) is produced in G groups. Group g is
``F_g(reshape(LoNKr(g)))``:

- LoNKr: the Kronecker product of K small factors; each factor is low rank: ``B A`` for tensor
  order M = 2 (K = 1 is LoRA on the reshaped group, K = 2 is LoKr), or a Tucker core with M
  factor matrices for M >= 3 (LoRTA);
- F_g: when rho < 1, a FIXED sparse random projection from ``ceil(rho * |g|)`` numbers up to
  ``|g|`` (each output takes one input, with a hashed index and sign; no stored matrix);
- shuffle: a fixed pseudo-random permutation of dW_all (an affine map i -> (a i + c) mod D with
  gcd(a, D) = 1, regenerated from the seed, so nothing D-sized is stored).

Unshuffled groups are runs of whole layers (G = number of layers with K = 1, M = 2 is exactly
layer-wise LoRA, each layer in its own out x in shape); shuffled groups are equal chunks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from studio.adapters.base import AdapterBase
from studio.adapters.layers import DEFAULT_TARGETS, in_features, select_layers
from studio.bases import ModuleTree
from studio.options import option

FAMILY = "superlora"
_HASH = 2654435761  # Knuth's multiplicative hash constant


@dataclass(frozen=True)
class Config:
    """SuperLoRA knobs: groups G, Kronecker splits K, rank, tensor order M, ratio rho, shuffle."""

    groups: int = option(1, "G: the targeted layers' weights are grouped into G super-weights, one LoRA each", minimum=1, maximum=100_000)
    splits: int = option(1, "K: Kronecker factors per group (K > 1: LoNKr)", minimum=1, maximum=64)
    rank: int = option(4, "rank of each group's factors", minimum=1, maximum=1024)
    order: int = option(2, "M: tensor order of a group (2: matrix LoRA; 3+: Tucker)", minimum=2, maximum=8)
    rho: float = option(1.0, "share of each group's super-weight that is learned (the rest is a fixed projection)", minimum=0, exclusive_minimum=True, maximum=1.0)
    shuffle: bool = option(False, "shuffle weights across groups with a fixed hash before grouping")
    seed: int = option(0, "seed of the shuffle and fixed projections", minimum=0)
    alpha: float = option(4.0, "update scale alpha / rank", minimum=0, exclusive_minimum=True)
    targets: tuple[str, ...] = option(DEFAULT_TARGETS, "module name suffixes or globs to adapt")
    components: tuple[str, ...] = option(("unet",), "pipeline components to adapt: unet, text_encoder, text_encoder_2")

    def __post_init__(self) -> None:
        if self.groups < 1 or self.splits < 1 or self.rank < 1 or self.order < 2:
            raise ValueError("groups, splits, rank must be >= 1 and order >= 2")
        if not 0 < self.rho <= 1:
            raise ValueError(f"rho must be in (0, 1], got {self.rho}")


def _root_dims(size: int, order: int) -> list[int]:
    """An ``order``-dim shape close to a cube whose product is >= size."""
    side = max(1, math.ceil(size ** (1.0 / order)))
    dims = [side] * order
    while order > 1 and math.prod(dims[:-1]) * (dims[-1] - 1) >= size:
        dims[-1] -= 1
    return dims


class Factor(nn.Module):
    """One low-rank M-order tensor: B A (M = 2) or a Tucker core with M factor matrices."""

    def __init__(self, shape: list[int], rank: int, zero: bool, generator: torch.Generator):
        super().__init__()
        ranks = [min(rank, s) for s in shape]
        self.shape = shape
        if len(shape) == 2:
            r = min(ranks)
            self.up = nn.Parameter(torch.zeros(shape[0], r) if zero else torch.randn(shape[0], r, generator=generator) / math.sqrt(r))
            self.down = nn.Parameter(torch.randn(r, shape[1], generator=generator) / math.sqrt(shape[1]))
        else:
            core = torch.zeros(ranks) if zero else torch.randn(ranks, generator=generator) / math.sqrt(math.prod(ranks))
            self.core = nn.Parameter(core)
            self.mats = nn.ParameterList(
                nn.Parameter(torch.randn(s, r, generator=generator) / math.sqrt(r)) for s, r in zip(shape, ranks)
            )

    def forward(self) -> Tensor:
        if len(self.shape) == 2:
            return self.up @ self.down
        tensor = self.core
        for mode, mat in enumerate(self.mats):  # mode-n product: contract dim `mode` with mat
            tensor = torch.movedim(torch.tensordot(mat, tensor, dims=([1], [mode])), 0, mode)
        return tensor


class Group(nn.Module):
    """One group: the Kronecker product of K factors, cropped, optionally projected up."""

    def __init__(self, size: int, target: list[int], config: Config, index: int, generator: torch.Generator):
        super().__init__()
        self.size, self.target, self.index = size, target, index
        self.inner = size if config.rho == 1 else max(1, math.ceil(config.rho * size))
        if self.inner != size or math.prod(target) < self.inner:
            self.target = _root_dims(self.inner, config.order)
        split = [max(1, math.ceil(t ** (1.0 / config.splits))) for t in self.target]
        self.factors = nn.ModuleList(Factor(list(split), config.rank, k == 0, generator) for k in range(config.splits))

    def forward(self) -> Tensor:
        tensor = self.factors[0]()
        for factor in self.factors[1:]:
            tensor = torch.kron(tensor, factor())
        tensor = tensor[tuple(slice(0, t) for t in self.target)].reshape(-1)[: self.inner]
        return tensor if self.inner == self.size else self._project(tensor)

    def _project(self, small: Tensor) -> Tensor:
        """Fixed sparse random projection: output i = sign_i * small[h(i)] * sqrt(rho)."""
        rows = torch.arange(self.size, device=small.device, dtype=torch.int64)
        hashed = (rows * _HASH + self.index * 97 + 12345) % (2**32)
        sign = 1.0 - 2.0 * ((hashed >> 16) & 1).to(small.dtype)
        return small[hashed % self.inner] * sign * math.sqrt(self.inner / self.size)


def _layer_runs(count: int, groups: int) -> list[range]:
    """Split ``count`` layers into ``groups`` contiguous runs of near-equal length."""
    if groups > count:
        raise ValueError(f"groups={groups} exceeds the {count} targeted layers (use shuffle for finer groups)")
    bounds = [round(i * count / groups) for i in range(groups + 1)]
    return [range(bounds[i], bounds[i + 1]) for i in range(groups)]


def _coprime_stride(total: int, seed: int) -> int:
    generator = torch.Generator().manual_seed(seed)
    stride = int(torch.randint(total // 3 + 1, max(total // 3 + 2, total), (1,), generator=generator))
    while math.gcd(stride, total) != 1:
        stride += 1
    return stride


class TrainableSuperLora(nn.Module, AdapterBase):
    """Every targeted layer's dW produced together, group by group."""

    computes_layers_together = True  # every layer's dW comes from one flat vector: deltas() once per forward

    def __init__(self, config: Config, shapes: dict[str, tuple[int, ...]]):
        super().__init__()
        self.config = config
        self.scale = config.alpha / config.rank
        self.shapes = {layer: (shape[0], in_features(shape)) for layer, shape in shapes.items()}
        self._layers = list(shapes)
        sizes = [out * inn for out, inn in self.shapes.values()]
        self.total = sum(sizes)
        generator = torch.Generator().manual_seed(config.seed)
        self.groups = nn.ModuleList(
            Group(size, target, config, g, generator) for g, (size, target) in enumerate(self._group_plan(sizes))
        )
        self.stride = _coprime_stride(self.total, config.seed) if config.shuffle else 1
        self.offset = (config.seed * 7919) % self.total if config.shuffle else 0

    def _group_plan(self, sizes: list[int]) -> list[tuple[int, list[int]]]:
        """(size, reshape target) of each group."""
        config = self.config
        if config.shuffle:
            bounds = [round(i * self.total / config.groups) for i in range(config.groups + 1)]
            return [(bounds[i + 1] - bounds[i], _root_dims(bounds[i + 1] - bounds[i], config.order)) for i in range(config.groups)]
        plan = []
        shapes = list(self.shapes.values())
        for run in _layer_runs(len(sizes), config.groups):
            size = sum(sizes[i] for i in run)
            single = len(run) == 1 and config.order == 2
            plan.append((size, list(shapes[run[0]]) if single else _root_dims(size, config.order)))
        return plan

    def layers(self) -> list[str]:
        return list(self._layers)

    def flat(self) -> Tensor:
        """dW_all, the concatenated vectorised updates of every layer (scale included)."""
        produced = torch.cat([group() for group in self.groups]) * self.scale
        if not self.config.shuffle:
            return produced
        index = (torch.arange(self.total, device=produced.device) * self.stride + self.offset) % self.total
        return produced[index]

    def deltas(self) -> dict[str, Tensor]:
        """Every layer's dW from one pass over the groups."""
        flat, out, start = self.flat(), {}, 0
        for layer, (rows, cols) in self.shapes.items():
            out[layer] = flat[start:start + rows * cols].reshape(rows, cols)
            start += rows * cols
        return out

    def delta(self, layer: str) -> Tensor:
        return self.deltas()[layer]


def build(config: Config, tree: ModuleTree) -> TrainableSuperLora:
    """A fresh SuperLoRA over the layers of ``tree`` that match ``config.targets``."""
    layers = select_layers(tree, config.targets, config.components)
    return TrainableSuperLora(config, {layer: tree.modules[layer].weight_shape for layer in layers})
