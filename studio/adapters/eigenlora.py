"""EigenLoRAx adapters: frozen per-layer components, trainable loadings.

For each layer, dW = (U_B beta)(alpha V_A) with frozen components V_A (K, in) and U_B (out, K)
shared by a collection, and loadings alpha (r, K), beta (K, r) owned by one adapter. A
compressed collection gives one of these back for each stored adapter; a new adapter trains only
its loadings (2 K r numbers per layer instead of r (in + out)). `to_lora` writes it as a plain
LoRA exactly: A = alpha V_A, B = U_B beta, alpha = rank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from studio.adapters.base import AdapterBase
from studio.adapters.lora import LoraAdapter, LoraLayer


@dataclass
class EigenLoraConfig:
    """A new EigenLoRA adapter on a compressed collection's components.

    ``collection``: path of the compressed collection file; ``k``: components per layer (None:
    as stored; smaller keeps the leading ones); ``augment``: P extra random components,
    orthogonal to the stored ones (seeded by ``seed``); ``rank``: r of the loadings.
    """

    collection: str = ""
    k: int | None = None
    augment: int = 0
    seed: int = 0
    rank: int = 32

    def __post_init__(self) -> None:
        if self.k is not None and self.k < 1:
            raise ValueError(f"EigenLoraConfig.k must be >= 1 or None, got {self.k}")
        if self.augment < 0 or self.rank < 1:
            raise ValueError(f"EigenLoraConfig needs augment >= 0 and rank >= 1, got {self.augment}, {self.rank}")


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
    def new(cls, name: str, components: dict[str, tuple[Tensor, Tensor]], rank: int, seed: int = 0) -> "EigenLoraAdapter":
        """A fresh adapter to train: alpha random (Kaiming-uniform over K), beta zero, so dW = 0."""
        generator = torch.Generator().manual_seed(seed)
        layers = {}
        for layer, (down_components, up_components) in components.items():
            k = down_components.shape[0]
            bound = 1.0 / math.sqrt(max(k, 1))
            alpha = (torch.rand(rank, k, generator=generator) * 2 - 1) * bound
            beta = torch.zeros(k, rank)
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


FAMILY = "eigenlora"
Config = EigenLoraConfig


def build(config: EigenLoraConfig, tree) -> "EigenLoraAdapter":
    """A new trainable adapter on the components of ``config.collection`` (only loadings train).

    The components live in a compressed collection file; reading it is the subspace room's job,
    so it is imported here, at build time, and never by the math above.
    """
    from studio.errors import ConfigError
    from studio.subspace.collection import CompressedCollection

    if not config.collection:
        raise ConfigError("[adapter] family 'eigenlora' needs collection = <compressed collection file>")
    adapter = CompressedCollection.load(config.collection).new_adapter(config, name=FAMILY)
    unknown = [layer for layer in adapter.layers() if layer not in tree.modules]
    if unknown:
        raise ConfigError(f"collection {config.collection}: {len(unknown)} layer(s) not in base {tree.label}, e.g. {unknown[0]}")
    return adapter
