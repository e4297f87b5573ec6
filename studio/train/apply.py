"""What the training loop wraps around a frozen base: the trainee module, parameter helpers.

The adapter is attached to the pipeline's modules by ``studio.engine.patch.Attachment`` (the one
way updates are put onto modules: forward hooks, the frozen weights never rewritten).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from studio.bases.conditioning import predict
from studio.bases.family import base_of
from studio.train.conditioning import Conditioning, prompt_embeds


class Trainee(nn.Module):
    """The base's denoiser (UNet or transformer) + adapter in one module, so accelerate/DDP see the
    adapter's parameters. ``forward`` is one denoiser call the pipeline's way (``predict``: SDXL time
    ids, FLUX packing and guidance embedding ``guidance``), on VAE-layout latents."""

    def __init__(self, pipe: Any, adapter: nn.Module, guidance: float = 3.5):
        super().__init__()
        self.base = base_of(pipe)
        self.denoiser = getattr(pipe, self.base.denoiser)
        self.adapter = adapter
        self.guidance = guidance
        self.__dict__["pipe"] = pipe  # not a module: kept out of the module tree

    def forward(self, sample: Tensor, timesteps: Tensor, conditioning: Conditioning) -> Tensor:
        return predict(self.pipe, sample, timesteps, prompt_embeds(self.base, conditioning), self.guidance)


def trainable_parameters(adapter: nn.Module) -> list[nn.Parameter]:
    """The adapter's trainable numbers (frozen components excluded)."""
    return [p for p in adapter.parameters() if p.requires_grad]


def count_trainable(adapter: nn.Module) -> int:
    return sum(p.numel() for p in trainable_parameters(adapter))


def freeze(*modules: nn.Module) -> None:
    for module in modules:
        module.requires_grad_(False)
        module.eval()
