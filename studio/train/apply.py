"""What the training loop wraps around a frozen base: the trainee module, parameter helpers.

The adapter is attached to the pipeline's modules by ``studio.engine.patch.Attachment`` (the one
way updates are put onto modules: forward hooks, the frozen weights never rewritten).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn


class Trainee(nn.Module):
    """UNet + adapter in one module, so accelerate/DDP see the adapter's parameters."""

    def __init__(self, unet: nn.Module, adapter: nn.Module):
        super().__init__()
        self.unet = unet
        self.adapter = adapter

    def forward(self, sample: Tensor, timesteps: Tensor, conditioning: dict[str, Any]) -> Tensor:
        return self.unet(sample, timesteps, **conditioning, return_dict=False)[0]


def trainable_parameters(adapter: nn.Module) -> list[nn.Parameter]:
    """The adapter's trainable numbers (frozen components excluded)."""
    return [p for p in adapter.parameters() if p.requires_grad]


def count_trainable(adapter: nn.Module) -> int:
    return sum(p.numel() for p in trainable_parameters(adapter))


def freeze(*modules: nn.Module) -> None:
    for module in modules:
        module.requires_grad_(False)
        module.eval()
