"""The one adapter contract every family answers.

Layer names are the base pipeline's own module paths, prefixed by the component that owns
them: ``unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q``,
``text_encoder.text_model.encoder.layers.0.self_attn.q_proj``, ``text_encoder_2....``.

``delta(layer)`` is always a 2-D matrix ``(out, in * kh * kw)``: conv layers are handled as
linears on their flattened weight (METHODS.md). The engine reshapes it to the weight's shape.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import ClassVar, Protocol, runtime_checkable

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


class AdapterBase(abc.ABC):
    """The adapter contract with its optional capabilities declared, not discovered.

    A family subclasses this, implements ``layers`` and ``delta``, and sets a flag to True for each
    optional method it implements; callers read the flags (``capabilities``), never ``hasattr``:

    - ``has_factors``: ``factors(layer) -> (down (r, in_flat), up (out, r))`` with
      ``up @ down == delta(layer)`` (engines apply low-rank updates without building dW);
    - ``has_shared_basis``: ``basis(layer) -> (down_basis (K, in_flat), up_basis (out, K))`` and
      ``core(layer) -> (K, K)`` with ``delta == up_basis @ core @ down_basis``; ``basis`` returns the
      collection's own tensors, shared by every adapter of one collection;
    - ``computes_layers_together``: ``all_factors()`` / ``deltas()`` compute every layer in one pass
      (layers share one vector), so a trainer should call them once per forward.

    The undeclared methods raise NotImplementedError naming the family.
    """

    has_factors: ClassVar[bool] = False
    has_shared_basis: ClassVar[bool] = False
    computes_layers_together: ClassVar[bool] = False

    @abc.abstractmethod
    def layers(self) -> list[str]:
        """Targeted layers, as prefixed module names of the base pipeline."""

    @abc.abstractmethod
    def delta(self, layer: str) -> Tensor:
        """The weight update dW of one layer, shape (out, in_flat), strength 1."""

    def factors(self, layer: str) -> tuple[Tensor, Tensor]:
        """``(down, up)`` with ``up @ down == delta(layer)``; only where ``has_factors``."""
        raise NotImplementedError(f"{type(self).__name__} declares no factors (has_factors is False)")

    def basis(self, layer: str) -> tuple[Tensor, Tensor]:
        """``(down_basis, up_basis)`` shared by a collection; only where ``has_shared_basis``."""
        raise NotImplementedError(f"{type(self).__name__} declares no shared basis (has_shared_basis is False)")

    def core(self, layer: str) -> Tensor:
        """``(K, K)`` with ``delta == up_basis @ core @ down_basis``; only where ``has_shared_basis``."""
        raise NotImplementedError(f"{type(self).__name__} declares no shared basis (has_shared_basis is False)")

    def all_factors(self) -> dict[str, tuple[Tensor, Tensor]]:
        """Every layer's factors (one pass where ``computes_layers_together``)."""
        return {layer: self.factors(layer) for layer in self.layers()}

    def deltas(self) -> dict[str, Tensor]:
        """Every layer's dW (one pass where ``computes_layers_together``)."""
        return {layer: self.delta(layer) for layer in self.layers()}


@dataclass(frozen=True)
class Capabilities:
    """What an adapter declares beyond ``layers`` / ``delta``."""

    factors: bool = False
    shared_basis: bool = False
    layers_together: bool = False


def capabilities(adapter: object) -> Capabilities:
    """The declared capabilities of ``adapter``; an object that only follows the ``Adapter``
    protocol (not an ``AdapterBase``) declares none, so only ``delta`` is used."""
    if not isinstance(adapter, AdapterBase):
        return Capabilities()
    return Capabilities(bool(adapter.has_factors), bool(adapter.has_shared_basis), bool(adapter.computes_layers_together))


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
