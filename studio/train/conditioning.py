"""How a denoiser is conditioned on captions during training, for every base.

Captions are encoded by the base's own pipeline code (``studio.bases.conditioning.encode_prompts``,
which calls the pipeline's ``encode_prompt``), so training sees exactly what generation feeds the
denoiser: SD's CLIP states; SDXL's two CLIPs' penultimate states and pooled ``text_embeds``;
FLUX.1's T5 states (512 tokens, FluxPipeline's default) and CLIP pooled projection; SD3's CLIP +
T5 sequence (256 T5 tokens, its pipeline's default) and both CLIPs pooled. When no text-encoder
layer trains, the embeddings are computed once and cached; when one does, they are computed
every step with gradients through the adapter. The per-call extras (SDXL's time ids, FLUX's
packed latents, ``img_ids`` / ``txt_ids`` and guidance embedding) are added at the denoiser call
(``studio.bases.conditioning.predict``), from the latents' size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from studio.bases.conditioning import PromptEmbeds, encode_prompts
from studio.bases.family import Base, base_of
from studio.errors import BaseNotFoundError, ConfigError

Conditioning = dict[str, Tensor]  # {"sequence": (B, tokens, width), "pooled": (B, width) where the base has one}
MAX_SEQUENCE = {"flux1": 512, "sd3": 256}  # T5 tokens: the pipelines' own __call__ defaults


@dataclass
class Conditioner:
    """Captions -> the conditioning tensors of one base (see the module docstring)."""

    pipe: Any
    base: Base

    def embed(self, captions: list[str]) -> Conditioning:
        """Encode captions; autograd records through trained text-encoder layers when grad is enabled."""
        device = getattr(self.pipe, self.base.denoiser).device
        embeds = encode_prompts(self.pipe, list(captions), device, MAX_SEQUENCE.get(self.base.id, 256), grad=torch.is_grad_enabled())
        out = {"sequence": embeds.sequence}
        if embeds.pooled is not None:
            out["pooled"] = embeds.pooled
        return out


def conditioner_for(pipe: Any) -> Conditioner:
    """The conditioner of a loaded pipeline (SD1.x/2.x, SDXL, FLUX.1, SD3); others are refused by name."""
    try:
        base = base_of(pipe)
    except BaseNotFoundError as error:
        raise ConfigError(f"{type(pipe).__name__}: cannot train on this base ({error})") from error
    return Conditioner(pipe, base)


def prompt_embeds(base: Base, conditioning: Conditioning) -> PromptEmbeds:
    """The conditioning as `PromptEmbeds` (FLUX's text ids are zeros, as FluxPipeline makes them)."""
    sequence = conditioning["sequence"]
    text_ids = None
    if base.packed_latents:
        text_ids = torch.zeros(sequence.shape[1], 3, device=sequence.device, dtype=sequence.dtype)
    return PromptEmbeds(sequence, conditioning.get("pooled"), text_ids)


def select(conditioning: Conditioning, items: Tensor | list[int] | slice, device: Any, dtype: torch.dtype) -> Conditioning:
    """Rows ``items`` of cached conditioning, moved to the device (floating tensors cast to dtype)."""
    def pick(value: Tensor) -> Tensor:
        value = value[items].to(device)
        return value.to(dtype) if value.is_floating_point() else value
    return {key: pick(value) for key, value in conditioning.items()}


def concat(parts: list[Conditioning]) -> Conditioning:
    """Cached conditioning of several chunks joined along the batch dimension."""
    return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}


def detached(conditioning: Conditioning) -> Conditioning:
    """A float32 CPU copy without gradients (for the cache)."""
    return {key: value.detach().float().cpu() for key, value in conditioning.items()}
