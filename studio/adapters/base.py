"""The one adapter contract every family answers.

Layer names are the base pipeline's own module paths, prefixed by the component that owns
them: ``unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q``,
``text_encoder.text_model.encoder.layers.0.self_attn.q_proj``, ``text_encoder_2....``.

``delta(layer)`` is always a 2-D matrix ``(out, in * kh * kw)``: conv layers are handled as
linears on their flattened weight (METHODS.md). The engine reshapes it to the weight's shape.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


@runtime_checkable
class Adapter(Protocol):
    """Anything the engine or trainer can apply: layer names and a weight update per layer."""

    def layers(self) -> list[str]:
        """Targeted layers, as prefixed module names of the base pipeline."""
        ...

    def delta(self, layer: str) -> Tensor:
        """The weight update dW of one layer, shape (out, in_flat), strength 1."""
        ...


@runtime_checkable
class LowRankAdapter(Adapter, Protocol):
    """An adapter whose update of a layer is a product ``up @ down`` (scale folded in).

    Engines use the factors for unmerged application (several adapters in one batch).
    """

    def factors(self, layer: str) -> tuple[Tensor, Tensor]:
        """``(down, up)`` with down (r, in_flat), up (out, r) and ``up @ down == delta(layer)``."""
        ...


def component_of(layer: str) -> tuple[str, str]:
    """Split ``unet.down_blocks.0...`` into ("unet", "down_blocks.0...")."""
    component, _, module = layer.partition(".")
    if component not in COMPONENTS or not module:
        raise ValueError(f"layer name {layer!r} does not start with one of {COMPONENTS}")
    return component, module


def weight_shape_delta(delta: Tensor, weight_shape: torch.Size | tuple[int, ...]) -> Tensor:
    """Reshape a 2-D delta to a module weight's shape (linear or conv)."""
    if delta.numel() != torch.Size(weight_shape).numel():
        raise ValueError(f"delta of shape {tuple(delta.shape)} does not fit weight {tuple(weight_shape)}")
    return delta.reshape(weight_shape)
