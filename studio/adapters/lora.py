"""Plain LoRA: the in-memory type every file format is parsed into and written from.

dW = (alpha / r) * B @ A, with A ("down", r x in) and B ("up", out x r). Conv LoRAs keep
their native 4-D shapes (LoCon: down (r, in, kh, kw), up (out, r, 1, 1)) so files round-trip
tensor for tensor; `delta` flattens them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from studio.adapters.base import AdapterBase
from studio.errors import FormatError

AlphaSource = Literal["file", "rank-default"]
SourceFormat = Literal["kohya", "diffusers", "diffusers-old", "peft", "lycoris-loha", "lycoris-lokr", "studio"]


@dataclass
class LoraLayer:
    """One layer of a LoRA: down (A), up (B) and alpha as stored in the file."""

    down: Tensor
    up: Tensor
    alpha: float
    alpha_source: AlphaSource = "file"

    def __post_init__(self) -> None:
        if self.down.dim() not in (2, 4) or self.up.dim() not in (2, 4):
            raise FormatError(f"LoRA factors must be 2-D or 4-D, got down {tuple(self.down.shape)}, up {tuple(self.up.shape)}")
        if self.down.shape[0] != self.up.shape[1]:
            raise FormatError(
                f"rank mismatch: down has {self.down.shape[0]} rows, up has {self.up.shape[1]} columns"
            )
        if self.up.dim() == 4 and tuple(self.up.shape[2:]) != (1, 1):
            raise FormatError(f"conv LoRA up must be 1x1, got {tuple(self.up.shape)}")

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def in_features(self) -> int:
        return int(self.down[0].numel())

    @property
    def out_features(self) -> int:
        return int(self.up.shape[0])

    def factors(self) -> tuple[Tensor, Tensor]:
        """(down, up) as 2-D float32 matrices with the scale folded into up."""
        down = self.down.reshape(self.rank, -1).float()
        up = self.up.reshape(self.out_features, self.rank).float() * self.scale
        return down, up

    def delta(self) -> Tensor:
        down, up = self.factors()
        return up @ down


@dataclass
class LoraAdapter(AdapterBase):
    """A LoRA in memory: per-layer factors keyed by prefixed diffusers module names.

    ``metadata`` is the file's header metadata (kohya ``ss_*``, ``modelspec.*``), carried over
    on export. ``notes`` lists what import had to state (defaults taken, keys skipped).
    """

    name: str
    lora_layers: dict[str, LoraLayer]
    metadata: dict[str, str] = field(default_factory=dict)
    source_format: SourceFormat = "studio"
    notes: list[str] = field(default_factory=list)
    base_arch: str = ""

    has_factors = True  # AdapterBase capability (a plain class attribute, not a dataclass field)

    def layers(self) -> list[str]:
        return list(self.lora_layers)

    def delta(self, layer: str) -> Tensor:
        return self.lora_layers[layer].delta()

    def factors(self, layer: str) -> tuple[Tensor, Tensor]:
        return self.lora_layers[layer].factors()

    @property
    def ranks(self) -> list[int]:
        return sorted({layer.rank for layer in self.lora_layers.values()})

    @property
    def alphas(self) -> list[float]:
        return sorted({layer.alpha for layer in self.lora_layers.values()})

    def num_parameters(self) -> int:
        return sum(layer.down.numel() + layer.up.numel() for layer in self.lora_layers.values())

    def to(self, dtype: torch.dtype) -> "LoraAdapter":
        """A copy with every factor cast to ``dtype``."""
        cast = {
            name: LoraLayer(layer.down.to(dtype), layer.up.to(dtype), layer.alpha, layer.alpha_source)
            for name, layer in self.lora_layers.items()
        }
        return LoraAdapter(self.name, cast, dict(self.metadata), self.source_format, list(self.notes), self.base_arch)
