"""How a denoiser is conditioned on captions during training, per pipeline kind.

A ``Conditioner`` turns captions into token ids (cheap, kept for the whole run) and token ids into
the keyword arguments of the denoiser's forward (``encoder_hidden_states``, and for SDXL the
``added_cond_kwargs`` with the pooled text embedding and the size/crop time ids). When no
text-encoder layer trains, the embeddings are computed once and cached; when one does, they are
computed every step with gradients through the adapter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from studio.errors import ConfigError

Tokens = dict[str, Tensor]
Conditioning = dict[str, Any]


def _tokenize(tokenizer: Any, captions: list[str]) -> Tensor:
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids


@dataclass
class SDConditioner:
    """SD1.x / SD2.x: one CLIP text encoder, its last hidden states as cross-attention input."""

    pipe: Any

    def tokens(self, captions: list[str]) -> Tokens:
        return {"ids": _tokenize(self.pipe.tokenizer, captions)}

    def embed(self, tokens: Tokens, resolution: int) -> Conditioning:
        device = self.pipe.text_encoder.device
        return {"encoder_hidden_states": self.pipe.text_encoder(tokens["ids"].to(device))[0]}


@dataclass
class SDXLConditioner:
    """SDXL: two CLIP text encoders (penultimate hidden states concatenated), the second one's
    pooled projection, and the time ids (original size, crop top-left, target size) that SDXL's
    UNet adds to its timestep embedding — as diffusers' StableDiffusionXLPipeline builds them."""

    pipe: Any

    def tokens(self, captions: list[str]) -> Tokens:
        return {"ids": _tokenize(self.pipe.tokenizer, captions), "ids_2": _tokenize(self.pipe.tokenizer_2, captions)}

    def embed(self, tokens: Tokens, resolution: int) -> Conditioning:
        first, second = self.pipe.text_encoder, self.pipe.text_encoder_2
        out_1 = first(tokens["ids"].to(first.device), output_hidden_states=True)
        out_2 = second(tokens["ids_2"].to(second.device), output_hidden_states=True)
        hidden = torch.cat([out_1.hidden_states[-2], out_2.hidden_states[-2]], dim=-1)
        pooled = out_2[0]
        count = hidden.shape[0]
        time_ids = torch.tensor([resolution, resolution, 0, 0, resolution, resolution], dtype=hidden.dtype, device=hidden.device)
        return {"encoder_hidden_states": hidden,
                "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids.expand(count, -1)}}


def conditioner_for(pipe: Any) -> SDConditioner | SDXLConditioner:
    """The conditioner of a loaded pipeline (UNet bases; transformer bases are refused by name)."""
    if getattr(pipe, "unet", None) is None:
        raise ConfigError(f"{type(pipe).__name__}: training needs a UNet base (SD1.x, SD2.x, SDXL); "
                          "transformer bases (FLUX, SD3) are not trainable yet")
    if getattr(pipe, "text_encoder_2", None) is not None:
        return SDXLConditioner(pipe)
    return SDConditioner(pipe)


def select(conditioning: Conditioning, items: Tensor | list[int], device: Any, dtype: torch.dtype) -> Conditioning:
    """Rows ``items`` of cached conditioning, moved to the device (floating tensors cast to dtype)."""
    def pick(value: Any) -> Any:
        if isinstance(value, dict):
            return {key: pick(inner) for key, inner in value.items()}
        value = value[items].to(device)
        return value.to(dtype) if value.is_floating_point() else value
    return pick(conditioning)


def concat(parts: list[Conditioning]) -> Conditioning:
    """Cached conditioning of several chunks joined along the batch dimension."""
    first = parts[0]
    return {key: concat([p[key] for p in parts]) if isinstance(value, dict) else torch.cat([p[key] for p in parts])
            for key, value in first.items()}


def detached(conditioning: Conditioning) -> Conditioning:
    """A float32 CPU copy without gradients (for the cache)."""
    return {key: detached(value) if isinstance(value, dict) else value.detach().float().cpu() for key, value in conditioning.items()}
