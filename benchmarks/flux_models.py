"""FLUX.1 pipelines and LoRAs for the FLUX benchmarks, built from configs (random weights, no hub).

``build_flux_pipeline(device, dtype)``: the real FLUX.1-dev transformer (studio/configs/flux1.json,
~11.9 B parameters) created directly on the device in the target dtype (no CPU copy, no fp32
copy), FLUX's VAE architecture, FLUX.1-dev's scheduler config. The text encoders are SMALL
random stand-ins with the real output widths (CLIP: 1 layer, hidden 768 -> pooled 768; T5: 1
layer, d_model 4096, d_ff 1024): the transformer reads only their outputs, so its cost is the
real one while the encoders' own cost is not measured. Token ids come from the world's word-level
CLIP tokenizer and a local T5 tokenizer over the same words (``tests.tiny_pipeline``).
``quick=True`` shrinks everything for a CPU smoke run.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Iterator

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from studio.adapters.lora import LoraAdapter  # noqa: E402
from studio.bases import CONFIG_DIR  # noqa: E402

FLUX_VAE = {  # black-forest-labs/FLUX.1-dev vae/config.json (architecture only)
    "in_channels": 3, "out_channels": 3, "latent_channels": 16, "layers_per_block": 2, "act_fn": "silu", "norm_num_groups": 32,
    "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4, "scaling_factor": 0.3611, "shift_factor": 0.1159,
    "use_quant_conv": False, "use_post_quant_conv": False, "sample_size": 1024,
}
FLUX_SCHEDULER = {  # FLUX.1-dev scheduler/scheduler_config.json
    "base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15,
    "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True,
}
ATTENTION = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
TEXT_NOTE = "text encoders are small random stand-ins with the real output widths (only the transformer's cost is measured)"


@contextlib.contextmanager
def built_as(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """Modules created inside are allocated on ``device`` in ``dtype`` from the start."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(before)


def transformer_config(quick: bool = False, schnell: bool = False) -> dict:
    name = "flux1-schnell" if schnell else "flux1"
    config = {k: v for k, v in json.loads((CONFIG_DIR / f"{name}.json").read_text())["transformer"].items() if not k.startswith("_")}
    if quick:
        config.update(num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
                      joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8])
    return config


def _text_encoders(quick: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from tests.tiny_pipeline import t5_tokenizer, world_tokenizer

    clip_tokenizer = world_tokenizer()
    clip_tokenizer.model_max_length = 77
    t5 = t5_tokenizer(clip_tokenizer)
    width, t5_width = (32, 32) if quick else (768, 4096)
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(clip_tokenizer), hidden_size=width, intermediate_size=2 * width, num_attention_heads=4 if quick else 12,
        num_hidden_layers=1, max_position_embeddings=77, projection_dim=width, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    encoder = T5EncoderModel(T5Config(
        vocab_size=len(t5), d_model=t5_width, d_ff=64 if quick else 1024, d_kv=8 if quick else 64, num_heads=4 if quick else 64,
        num_layers=1, feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False, pad_token_id=0, eos_token_id=1))
    return clip, clip_tokenizer, encoder, t5


def build_flux_pipeline(device: torch.device, dtype: torch.dtype, quick: bool = False, schnell: bool = False, seed: int = 0):
    """A FluxPipeline of the real FLUX.1 transformer with random weights on ``device`` (see the module docstring)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(seed)
    vae_config = dict(FLUX_VAE)
    if quick:
        vae_config.update(block_out_channels=[16, 32], down_block_types=["DownEncoderBlock2D"] * 2,
                          up_block_types=["UpDecoderBlock2D"] * 2, layers_per_block=1, norm_num_groups=8)
    with built_as(device, dtype):
        transformer = FluxTransformer2DModel(**transformer_config(quick, schnell))
        vae = AutoencoderKL(**vae_config)
        clip, clip_tokenizer, t5_model, t5 = _text_encoders(quick)
    for module in (transformer, vae, clip, t5_model):
        module.eval().requires_grad_(False)
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER), vae=vae, text_encoder=clip,
                        tokenizer=clip_tokenizer, text_encoder_2=t5_model, tokenizer_2=t5, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def attention_layers(transformer) -> list[str]:
    """Every attention projection of the double and single blocks (what FLUX LoRAs usually target)."""
    return [name for name, module in transformer.named_modules() if isinstance(module, torch.nn.Linear) and name.endswith(ATTENTION)]


def random_loras(transformer, count: int, rank: int, seed: int = 1) -> list[LoraAdapter]:
    """``count`` rank-r LoRAs (alpha = rank) on every attention projection of the transformer."""
    from engine_models import random_loras as random_model_loras

    return random_model_loras(transformer, count, rank, seed, attention_layers(transformer), "transformer", "flux")


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
