"""Trainable plain LoRA: dW_l = (alpha / r) * B_l A_l, A random (Kaiming), B zero (METHODS.md).

The file-exchange type is ``studio.adapters.lora.LoraAdapter``; this module is the nn.Module the
training loop optimises. Conv layers train on their flattened weight (A is r x in*kh*kw, LoCon).
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

FAMILY = "lora"


@dataclass(frozen=True)
class Config:
    """Plain LoRA knobs: rank r, alpha (scale alpha / r), which modules to target."""

    rank: int = option(8, "LoRA rank r (trainable numbers per layer: r * (in + out))", minimum=1, maximum=1024)
    alpha: float = option(8.0, "LoRA alpha: the update is scaled by alpha / r", minimum=0, exclusive_minimum=True)
    targets: tuple[str, ...] = option(DEFAULT_TARGETS, "module name suffixes or globs to adapt (text encoders: also q/k/v/out_proj)")
    components: tuple[str, ...] = option(("unet",), "pipeline components to adapt: unet, text_encoder, text_encoder_2")


def _key(layer: str) -> str:
    return layer.replace(".", "__")


class TrainableLora(nn.Module, AdapterBase):
    """Per-layer A (down) and B (up) parameters for the targeted layers of a base."""

    has_factors = True

    def __init__(self, config: Config, shapes: dict[str, tuple[int, ...]]):
        super().__init__()
        self.config = config
        self.scale = config.alpha / config.rank
        self._layers = list(shapes)
        self.down = nn.ParameterDict()
        self.up = nn.ParameterDict()
        for layer, shape in shapes.items():
            down = torch.empty(config.rank, in_features(shape))
            nn.init.kaiming_uniform_(down, a=math.sqrt(5))
            self.down[_key(layer)] = nn.Parameter(down)
            self.up[_key(layer)] = nn.Parameter(torch.zeros(shape[0], config.rank))

    def layers(self) -> list[str]:
        return list(self._layers)

    def factors(self, layer: str) -> tuple[Tensor, Tensor]:
        """(down, up) with the scale folded into up."""
        return self.down[_key(layer)], self.up[_key(layer)] * self.scale

    def delta(self, layer: str) -> Tensor:
        down, up = self.factors(layer)
        return up @ down

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


def expected_parameters(config: Config, shapes: dict[str, tuple[int, ...]]) -> int:
    """METHODS.md: r * (in + out) per layer."""
    return sum(config.rank * (in_features(shape) + shape[0]) for shape in shapes.values())


def build(config: Config, tree: ModuleTree) -> TrainableLora:
    """A fresh LoRA over the layers of ``tree`` that match ``config.targets``."""
    layers = select_layers(tree, config.targets, config.components)
    return TrainableLora(config, {layer: tree.modules[layer].weight_shape for layer in layers})
