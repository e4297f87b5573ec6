"""UNet inputs for the engine benchmarks and GPU tests (random, seeded)."""

from __future__ import annotations

import torch


def unet_inputs(unet, arch: str, batch: int, device: torch.device, dtype: torch.dtype) -> dict:
    """sample / timestep / encoder_hidden_states (and SDXL's added conditions) for ``batch`` rows."""
    config = unet.config
    size = config.sample_size
    generator = torch.Generator("cpu").manual_seed(0)
    inputs = {
        "sample": torch.randn(batch, config.in_channels, size, size, generator=generator).to(device, dtype),
        "timestep": torch.tensor(500, device=device),
        "encoder_hidden_states": torch.randn(batch, 77, config.cross_attention_dim, generator=generator).to(device, dtype),
    }
    if arch == "sdxl":
        text_dim = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        inputs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, text_dim, generator=generator).to(device, dtype),
            "time_ids": torch.tensor([[size * 8, size * 8, 0, 0, size * 8, size * 8]] * batch, device=device, dtype=dtype),
        }
    return inputs
