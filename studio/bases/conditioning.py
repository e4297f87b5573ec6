"""How one batch is conditioned, per `Base`: prompts -> embeddings -> one denoiser call -> training target.

For the trainer and the engine, so that neither checks pipeline classes. Each step calls the
pipeline's own code (``encode_prompt``, FLUX's ``_pack_latents`` / ``_prepare_latent_image_ids``,
SDXL's ``_get_add_time_ids``) so the conditioning is exactly what diffusers' pipelines do; tests
check one denoising step against the pipelines themselves.

- SD 1.x / 2.x: sequence = CLIP hidden states; target from the scheduler's prediction_type.
- SDXL: sequence = both CLIPs' penultimate states concatenated; ``added_cond_kwargs`` = pooled
  ``text_embeds`` (text_encoder_2) and ``time_ids`` (original size, crop, target size).
- FLUX.1: sequence = T5 states, pooled = CLIP; latents packed into 2x2 tokens with ``img_ids`` /
  ``txt_ids``; timestep / 1000; ``guidance`` embedding (dev) instead of a CFG batch; flow target.
- SD3: sequence = CLIPs (padded) then T5, pooled = both CLIPs; CFG batch; flow target.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from studio.bases.family import Base, base_of


@dataclass
class PromptEmbeds:
    """Encoded prompts: the sequence every denoiser attends to, and what each family adds."""

    sequence: Tensor  # (B, tokens, width): encoder_hidden_states
    pooled: Tensor | None = None  # SDXL text_embeds / FLUX and SD3 pooled_projections
    text_ids: Tensor | None = None  # FLUX rotary ids of the text tokens


def native_resolution(pipe) -> int:
    """The image side the base was trained at (SD 512, SDXL / FLUX / SD3 1024 for the real models)."""
    base = base_of(pipe)
    denoiser = getattr(pipe, base.denoiser)
    if base.packed_latents:
        return int(pipe.default_sample_size) * int(pipe.vae_scale_factor)
    return int(denoiser.config.sample_size) * int(pipe.vae_scale_factor)


def encode_prompts(pipe, prompts: list[str], device: torch.device | str = "cpu", max_sequence_length: int = 256,
                   grad: bool = False) -> PromptEmbeds:
    """Encode prompts the way the base's pipeline does (no negative batch; callers add CFG if the base uses it).

    ``grad``: keep the autograd graph (training LoRA layers inside a text encoder)."""
    base = base_of(pipe)
    with torch.set_grad_enabled(grad):
        if base.id == "flux1":
            sequence, pooled, text_ids = pipe.encode_prompt(prompts, prompt_2=prompts, device=device, max_sequence_length=max_sequence_length)
            return PromptEmbeds(sequence, pooled, text_ids)
        if base.id == "sd3":
            sequence, _, pooled, _ = pipe.encode_prompt(prompts, prompts, prompts, device=device, do_classifier_free_guidance=False, max_sequence_length=max_sequence_length)
            return PromptEmbeds(sequence, pooled)
        if base.id == "sdxl":
            sequence, _, pooled, _ = pipe.encode_prompt(prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False)
            return PromptEmbeds(sequence, pooled)
        sequence, _ = pipe.encode_prompt(prompts, device, 1, False)
        return PromptEmbeds(sequence)


def denoiser_kwargs(pipe, latents: Tensor, timesteps: Tensor, embeds: PromptEmbeds, guidance_scale: float = 3.5) -> dict:
    """Keyword arguments of one denoiser call on VAE-layout latents (B, C, H, W), the pipeline's way."""
    base = base_of(pipe)
    if base.packed_latents:
        batch, channels, height, width = latents.shape
        guidance = None
        if base.guidance_for(dict(pipe.transformer.config)) == "embedded":
            guidance = torch.full((batch,), guidance_scale, device=latents.device, dtype=torch.float32)
        return {
            "hidden_states": pipe._pack_latents(latents, batch, channels, height, width),
            "timestep": timesteps / base.timestep_divisor, "guidance": guidance,
            "pooled_projections": embeds.pooled, "encoder_hidden_states": embeds.sequence, "txt_ids": embeds.text_ids,
            "img_ids": pipe._prepare_latent_image_ids(batch, height // 2, width // 2, latents.device, latents.dtype),
            "return_dict": False,
        }
    if base.denoiser == "transformer":
        return {"hidden_states": latents, "timestep": timesteps, "encoder_hidden_states": embeds.sequence,
                "pooled_projections": embeds.pooled, "return_dict": False}
    kwargs = {"sample": latents, "timestep": timesteps, "encoder_hidden_states": embeds.sequence, "return_dict": False}
    if base.added_time_ids:
        kwargs["added_cond_kwargs"] = {"text_embeds": embeds.pooled, "time_ids": _time_ids(pipe, latents, embeds)}
    return kwargs


def _time_ids(pipe, latents: Tensor, embeds: PromptEmbeds) -> Tensor:
    size = (latents.shape[-2] * pipe.vae_scale_factor, latents.shape[-1] * pipe.vae_scale_factor)
    projection = int(embeds.pooled.shape[-1])
    ids = pipe._get_add_time_ids(size, (0, 0), size, dtype=embeds.sequence.dtype, text_encoder_projection_dim=projection)
    return ids.to(latents.device).repeat(latents.shape[0], 1)


def predict(pipe, latents: Tensor, timesteps: Tensor, embeds: PromptEmbeds, guidance_scale: float = 3.5) -> Tensor:
    """The denoiser's prediction for VAE-layout latents, in the same layout (FLUX tokens unpacked)."""
    base = base_of(pipe)
    denoiser = getattr(pipe, base.denoiser)
    output = denoiser(**denoiser_kwargs(pipe, latents, timesteps, embeds, guidance_scale))[0]
    if base.packed_latents:
        batch, channels, height, width = latents.shape
        output = output.view(batch, height // 2, width // 2, channels, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(latents.shape)
    return output


def noisy_and_target(base: Base, scheduler, latents: Tensor, noise: Tensor, timesteps: Tensor) -> tuple[Tensor, Tensor]:
    """(noisy latents, regression target) at integer timesteps in [0, num_train_timesteps).

    Flow matching (FLUX, SD3): sigma = t / num_train_timesteps, x_t = (1 - sigma) x0 + sigma noise,
    target = noise - x0 (the velocity the transformer predicts). SD / SDXL: the scheduler's
    add_noise, and epsilon or v from its prediction_type.
    """
    if base.target == "flow":
        sigma = (timesteps.float() / scheduler.config.num_train_timesteps).view(-1, *[1] * (latents.dim() - 1)).to(latents.dtype)
        return (1 - sigma) * latents + sigma * noise, noise - latents
    noisy = scheduler.add_noise(latents, noise, timesteps)
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noisy, noise
    if kind == "v_prediction":
        return noisy, scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"scheduler prediction_type {kind!r} is not epsilon or v_prediction")
