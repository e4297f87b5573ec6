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


# --- tiny SDXL, FLUX.1 and SD3 pipelines (random weights, the world's CLIP tokenizer) -------------

REPO_ROOT = Path(__file__).resolve().parents[1]
WORLD_TOKENIZER = REPO_ROOT / "assets" / "world" / "tokenizer"


def world_tokenizer():
    """The embedded world's CLIP tokenizer (word-level BPE, 20 tokens); the tests' CLIP tokenizer."""
    from transformers import CLIPTokenizer

    if not (WORLD_TOKENIZER / "tokenizer.json").is_file():
        raise FileNotFoundError(f"the world's tokenizer is missing at {WORLD_TOKENIZER}")
    return CLIPTokenizer.from_pretrained(str(WORLD_TOKENIZER))


def t5_tokenizer(clip_tokenizer):
    """A T5 (Unigram, SentencePiece-style) tokenizer over the world's words, built locally."""
    from transformers import T5Tokenizer

    words = sorted(token[: -len("</w>")] for token in clip_tokenizer.get_vocab() if token.endswith("</w>") and len(token) > 5)
    letters = sorted({char for word in words for char in word})
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -3.0)]
    vocab += [("\u2581" + word, -1.0) for word in words] + [(char, -5.0) for char in letters]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def _clip(tokenizer, hidden: int = 32, with_projection: bool = False, seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_attention_heads=4,
        num_hidden_layers=2, max_position_embeddings=32, projection_dim=hidden, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)


def _t5(tokenizer, d_model: int, seed: int = 0):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    return T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=d_model, d_ff=2 * d_model, d_kv=8, num_heads=4, num_layers=2,
        feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False, pad_token_id=0, eos_token_id=1,
    ))


def _flow_vae(latent_channels: int):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
        latent_channels=latent_channels, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
        shift_factor=0.0609, scaling_factor=1.5035,
    )


def build_tiny_flux_pipeline(folder: str | Path, seed: int = 0, guidance_embeds: bool = True) -> Path:
    """A tiny FluxPipeline (FLUX.1-dev module names; 1 double + 2 single blocks; CLIP + T5) saved as a folder."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    tokenizer = world_tokenizer()
    tokenizer_2 = t5_tokenizer(tokenizer)
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 4, 8), guidance_embeds=guidance_embeds,
    )
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=_flow_vae(1), text_encoder=_clip(tokenizer, seed=seed + 1),
        tokenizer=tokenizer, text_encoder_2=_t5(tokenizer_2, 32, seed=seed + 2), tokenizer_2=tokenizer_2, transformer=transformer,
    )
    return _save(pipe, Path(folder) / "flux")


def build_tiny_sd3_pipeline(folder: str | Path, seed: int = 0) -> Path:
    """A tiny StableDiffusion3Pipeline (SD3.5-Medium module names: qk norm, attn2 in block 0, a pre-only last block)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    tokenizer = world_tokenizer()
    tokenizer_3 = t5_tokenizer(tokenizer)
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=32, patch_size=1, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=4,
        caption_projection_dim=32, joint_attention_dim=64, pooled_projection_dim=64, pos_embed_max_size=32,
        qk_norm="rms_norm", dual_attention_layers=(0,),
    )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=_flow_vae(4),
        text_encoder=_clip(tokenizer, with_projection=True, seed=seed + 1), tokenizer=tokenizer,
        text_encoder_2=_clip(tokenizer, with_projection=True, seed=seed + 2), tokenizer_2=tokenizer,
        text_encoder_3=_t5(tokenizer_3, 64, seed=seed + 3), tokenizer_3=tokenizer_3,
    )
    return _save(pipe, Path(folder) / "sd3")


def build_tiny_sdxl_pipeline(folder: str | Path, seed: int = 0) -> Path:
    """A tiny StableDiffusionXLPipeline (SDXL module names: text_time added embeddings, two CLIPs)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    tokenizer = world_tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80, cross_attention_dim=64, norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, norm_num_groups=8, sample_size=32,
    )
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=_clip(tokenizer, seed=seed + 1), text_encoder_2=_clip(tokenizer, with_projection=True, seed=seed + 2),
        tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, scheduler=scheduler,
    )
    return _save(pipe, Path(folder) / "sdxl")


def _save(pipe, folder: Path) -> Path:
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder
