"""EigenLoRAx adapters: frozen per-layer components, trainable loadings.

For each layer, dW = (U_B beta)(alpha V_A) with frozen components V_A (K, in) and U_B (out, K)
shared by a collection, and loadings alpha (r, K), beta (K, r) owned by one adapter. A
compressed collection gives one of these back for each stored adapter; a new adapter trains only
its loadings (2 K r numbers per layer instead of r (in + out)). `to_lora` writes it as a plain
LoRA exactly: A = alpha V_A, B = U_B beta, alpha = rank.

Pure torch: this module never opens a file. A trainable adapter on a collection file is built by
`studio.subspace.training.build` (the subspace room reads collections).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from studio.adapters.base import AdapterBase
from studio.adapters.lora import LoraAdapter, LoraLayer


Init = Literal["zero", "mean", "nearest"]
INITS = ("zero", "mean", "nearest")


@dataclass
class EigenLoraConfig:
    """A new EigenLoRA adapter on a compressed collection's components (the ``[adapter]`` table of
    a train config with ``family = "eigenlora"``)."""

    collection: str = field(default="", metadata={"help": "compressed collection file (from `studio compress`) whose components the adapter uses"})
    k: int | None = field(default=None, metadata={"help": "components per layer (default: as stored; smaller keeps the leading ones)"})
    augment: int = field(default=0, metadata={"help": "P extra random components per layer, orthogonal to the stored ones (seeded by seed)"})
    seed: int = field(default=0, metadata={"help": "seed of the augmented components and of the random initial loadings"})
    rank: int = field(default=32, metadata={"help": "r of the loadings alpha (r x K) and beta (K x r)"})
    init: Init = field(default="zero", metadata={"help": (
        "starting update: 'zero' (dW = 0, alpha random, beta zero, as LoRA), 'mean' (the collection's mean "
        "adapter: the mean of the stored adapters' loadings cores beta @ alpha per layer), 'nearest' (the stored "
        "adapter closest to init_reference, or the one closest to the mean when init_reference is empty)"
    )})
    init_reference: str = field(default="", metadata={"help": (
        "with init = 'nearest': a stored adapter's name, or a LoRA file whose nearest stored adapter (by update cosine) starts the training"
    )})

    def __post_init__(self) -> None:
        if self.k is not None and self.k < 1:
            raise ValueError(f"EigenLoraConfig.k must be >= 1 or None, got {self.k}")
        if self.augment < 0 or self.rank < 1:
            raise ValueError(f"EigenLoraConfig needs augment >= 0 and rank >= 1, got {self.augment}, {self.rank}")
        if self.init not in INITS:
            raise ValueError(f"EigenLoraConfig.init must be one of {', '.join(INITS)}, got {self.init!r}")
        if self.init_reference and self.init != "nearest":
            raise ValueError(f"EigenLoraConfig.init_reference is used with init = 'nearest' only (init is {self.init!r})")


class EigenLoraLayer(nn.Module):
    """One layer: frozen ``down_components`` (K, in), ``up_components`` (out, K) as buffers,
    trainable ``alpha`` (r, K) and ``beta`` (K, r)."""

    def __init__(self, down_components: Tensor, up_components: Tensor, alpha: Tensor, beta: Tensor) -> None:
        super().__init__()
        k = down_components.shape[0]
        if up_components.shape[1] != k or alpha.shape[1] != k or beta.shape[0] != k or alpha.shape[0] != beta.shape[1]:
            raise ValueError(
                f"EigenLoRA shapes do not fit: down_components {tuple(down_components.shape)}, up_components "
                f"{tuple(up_components.shape)}, alpha {tuple(alpha.shape)}, beta {tuple(beta.shape)}"
            )
        self.register_buffer("down_components", down_components)
        self.register_buffer("up_components", up_components)
        self.alpha = nn.Parameter(alpha.float().clone())
        self.beta = nn.Parameter(beta.float().clone())

    def factors(self) -> tuple[Tensor, Tensor]:
        """``(down, up)`` = (alpha V_A, U_B beta); up @ down is the layer's update."""
        return self.alpha @ self.down_components, self.up_components @ self.beta

    def delta(self) -> Tensor:
        down, up = self.factors()
        return up @ down


class EigenLoraAdapter(nn.Module, AdapterBase):
    """An adapter on shared components; only the loadings are parameters.

    ``layer_modules`` are keyed by position; ``layers()`` gives the prefixed module names.
    ``weight_shapes`` optionally keeps each layer's original down / up tensor shapes (conv LoRAs)
    so that `to_lora` restores them.
    """

    has_factors = True
    has_shared_basis = True

    def __init__(
        self,
        name: str,
        layers: dict[str, EigenLoraLayer],
        metadata: dict[str, str] | None = None,
        weight_shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] | None = None,
    ) -> None:
        super().__init__()
        self.name = name
        self._names = list(layers)
        self._index = {layer: i for i, layer in enumerate(self._names)}
        self.layer_modules = nn.ModuleList(layers.values())
        self.metadata = dict(metadata or {})
        self.weight_shapes = dict(weight_shapes or {})

    @classmethod
    def new(cls, name: str, components: dict[str, tuple[Tensor, Tensor]], rank: int, seed: int = 0, cores: dict[str, Tensor] | None = None) -> "EigenLoraAdapter":
        """A fresh adapter to train. Without ``cores``: alpha random (Kaiming-uniform over K), beta
        zero, so dW = 0. With ``cores`` (layer -> K x K starting core C, dW = U C V): the rank-r
        balanced factors of C (beta = P S^1/2, alpha = S^1/2 R^T from its SVD); directions beyond
        C's rank get random alpha rows and zero beta columns, so they train from dW unchanged."""
        generator = torch.Generator().manual_seed(seed)
        layers = {}
        for layer, (down_components, up_components) in components.items():
            k = down_components.shape[0]
            bound = 1.0 / math.sqrt(max(k, 1))
            alpha = (torch.rand(rank, k, generator=generator) * 2 - 1) * bound
            beta = torch.zeros(k, rank)
            if cores is not None and layer in cores:
                alpha, beta = _factor_core(cores[layer].double(), alpha, beta)
            layers[layer] = EigenLoraLayer(down_components, up_components, alpha, beta)
        return cls(name, layers)

    def layers(self) -> list[str]:
        return list(self._names)

    def layer(self, layer: str) -> EigenLoraLayer:
        if layer not in self._index:
            raise KeyError(f"EigenLoRA adapter {self.name!r} has no layer {layer!r}")
        return self.layer_modules[self._index[layer]]

    def factors(self, layer: str) -> tuple[Tensor, Tensor]:
        return self.layer(layer).factors()

    def delta(self, layer: str) -> Tensor:
        return self.layer(layer).delta()

    def basis(self, layer: str) -> tuple[Tensor, Tensor]:
        """``(down_components (K, in), up_components (out, K))``: the collection's own tensors, shared by
        every adapter of one collection (engines compute ``x V_A^T`` once for a whole batch)."""
        module = self.layer(layer)
        return module.down_components, module.up_components

    def core(self, layer: str) -> Tensor:
        """``beta @ alpha`` (K, K), so that ``delta(layer) == up_components @ core @ down_components``."""
        module = self.layer(layer)
        return module.beta @ module.alpha

    def loadings(self) -> list[nn.Parameter]:
        """The trainable parameters (every alpha and beta)."""
        return [p for module in self.layer_modules for p in (module.alpha, module.beta)]

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.loadings())

    @torch.no_grad()
    def to_lora(self) -> LoraAdapter:
        """The same update as a plain LoRA: A = alpha V_A, B = U_B beta, alpha = rank (scale 1)."""
        lora_layers = {}
        for layer in self._names:
            down, up = (t.detach().float().cpu().contiguous() for t in self.factors(layer))
            down_shape, up_shape = self.weight_shapes.get(layer, (tuple(down.shape), tuple(up.shape)))
            lora_layers[layer] = LoraLayer(down.reshape(down_shape), up.reshape(up_shape), float(down.shape[0]))
        return LoraAdapter(self.name, lora_layers, dict(self.metadata), "studio")


CORE_TOLERANCE = 1e-7  # singular values of a starting core below this fraction of the largest are zero


def _factor_core(core: Tensor, alpha: Tensor, beta: Tensor) -> tuple[Tensor, Tensor]:
    """Balanced rank-r factors of ``core`` (K x K) written into copies of ``alpha`` (r, K) / ``beta`` (K, r):
    the leading singular directions, at most r (a core of higher rank is truncated); rows of alpha beyond
    the core's rank keep their random values and beta's columns their zeros."""
    left, values, right = torch.linalg.svd(core)
    nonzero = int((values > CORE_TOLERANCE * values[:1].clamp_min(torch.finfo(values.dtype).tiny)).sum()) if values.numel() else 0
    count = min(alpha.shape[0], nonzero)
    root = values[:count].sqrt()
    alpha, beta = alpha.clone(), beta.clone()
    alpha[:count] = (root.unsqueeze(1) * right[:count]).float()
    beta[:, :count] = (left[:, :count] * root.unsqueeze(0)).float()
    return alpha, beta


FAMILY = "eigenlora"
Config = EigenLoraConfig
