"""The world's small SD-architecture models, built from sizes (module names as in SD1.5).

UNet: CrossAttnDown x (n-1) + Down, mirrored up, cross-attention on the text encoder's hidden
states. VAE: AutoencoderKL with a 4-channel latent at 1/4 of the image side. Text encoder: a
small CLIPTextModel. The scheduler uses a linear beta schedule (terminal SNR near zero) so that
the generated image's mean colour follows the prompt, with 'trailing' timesteps for DDIM.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ModelSizes:
    """Widths and depths of the three networks."""

    unet_channels: tuple[int, ...] = (64, 128, 128)
    unet_layers_per_block: int = 1
    unet_heads: int = 8
    vae_channels: tuple[int, ...] = (32, 64, 64)
    text_hidden: int = 64
    text_layers: int = 2
    text_heads: int = 4
    max_length: int = 20
    image_size: int = 64
    latent_channels: int = 4

    @property
    def latent_size(self) -> int:
        return self.image_size // 2 ** (len(self.vae_channels) - 1)


def make_vae(sizes: ModelSizes):
    from diffusers import AutoencoderKL

    n = len(sizes.vae_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=sizes.latent_channels,
        block_out_channels=tuple(sizes.vae_channels), down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n, layers_per_block=1,
        norm_num_groups=min(32, min(sizes.vae_channels)), sample_size=sizes.image_size,
    )


def make_unet(sizes: ModelSizes):
    from diffusers import UNet2DConditionModel

    n = len(sizes.unet_channels)
    down = ("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",)
    up = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1)
    return UNet2DConditionModel(
        sample_size=sizes.latent_size, in_channels=sizes.latent_channels, out_channels=sizes.latent_channels,
        layers_per_block=sizes.unet_layers_per_block, block_out_channels=tuple(sizes.unet_channels),
        down_block_types=down, up_block_types=up, cross_attention_dim=sizes.text_hidden,
        attention_head_dim=sizes.unet_heads, norm_num_groups=min(32, min(sizes.unet_channels)),
    )


def make_text_encoder(sizes: ModelSizes, vocab_size: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=sizes.text_hidden, intermediate_size=4 * sizes.text_hidden,
        num_attention_heads=sizes.text_heads, num_hidden_layers=sizes.text_layers,
        max_position_embeddings=sizes.max_length, bos_token_id=0, eos_token_id=1, pad_token_id=1,
        projection_dim=sizes.text_hidden,
    ))


def make_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing="trailing",
        prediction_type="epsilon",
    )


def assemble_pipeline(vae, text_encoder, tokenizer, unet):
    """A StableDiffusionPipeline of the given parts, without a safety checker."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=make_scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
