"""A tiny Stable Diffusion pipeline built from configs with random weights, for tests.

Same module names as SD1.5 (down_blocks.N.attentions.M.transformer_blocks.0.attn1.to_q, ...),
a few hundred thousand parameters, saved as a normal diffusers folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

WORDS = "a an the red green blue yellow white black circle square triangle on background small large".split()


def _write_tokenizer(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    letters = sorted({c for word in WORDS for c in word})
    for token in letters + [c + "</w>" for c in letters] + [w + "</w>" for w in WORDS]:
        vocab.setdefault(token, len(vocab))
    merges = ["#version: 0.2"]
    seen = set()
    for word in WORDS:  # merge letters left to right into the whole word
        current = word[0]
        for i, char in enumerate(word[1:], start=1):
            right = char + ("</w>" if i == len(word) - 1 else "")
            merged = current + right
            if (current, right) not in seen:
                merges.append(f"{current} {right}")
                seen.add((current, right))
            vocab.setdefault(merged, len(vocab))
            current = merged
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("\n".join(merges) + "\n")


def build_tiny_pipeline(folder: str | Path, seed: int = 0) -> Path:
    """Create and save a tiny StableDiffusionPipeline with random (seeded) weights."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder = Path(folder)
    torch.manual_seed(seed)
    _write_tokenizer(folder / "tokenizer_src")
    tokenizer = CLIPTokenizer(str(folder / "tokenizer_src" / "vocab.json"), str(folder / "tokenizer_src" / "merges.txt"), model_max_length=16)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_attention_heads=4,
        num_hidden_layers=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    ))
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=8,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, norm_num_groups=8, sample_size=16,
    )
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(folder / "pipeline", safe_serialization=True)
    return folder / "pipeline"
