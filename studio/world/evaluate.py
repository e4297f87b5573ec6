"""Measuring the world: does the base follow its captions, does each LoRA move toward its style?

- ``caption_accuracy``: generate one image per prompt 'a <colour> <shape> on a <bg> background'
  and judge each with the pixel checker (``judge.py``).
- ``style_improvements``: denoising loss on a style's held-out images with and without its LoRA
  (same noise, same timesteps); improvement = 1 - with / without.
Both are used by the build's report and by the tests on the shipped assets.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from studio.adapters.lora import LoraAdapter
from studio.engine.patch import component_modules, merged
from studio.world.judge import judge
from studio.world.scene import Scene, sample_scenes
from studio.world.train import encode_latents, validation_loss


@dataclass
class CaptionAccuracy:
    colour: float
    shape: float
    count: int
    failures: list[str]


def eval_prompts(n: int, seed: int) -> list[Scene]:
    """Scenes whose short captions are the evaluation prompts (fixed by ``seed``)."""
    return sample_scenes(n, seed)


@torch.no_grad()
def generate(pipe, prompts: list[str], seed: int, steps: int = 25, guidance: float = 4.0, batch: int = 64) -> Tensor:
    """uint8 images (N, 3, H, W) for ``prompts``; image i uses generator seed + i."""
    out = []
    device = pipe.unet.device
    for start in range(0, len(prompts), batch):
        chunk = prompts[start:start + batch]
        gens = [torch.Generator(device="cpu").manual_seed(seed + start + i) for i in range(len(chunk))]
        shape = (len(chunk), pipe.unet.config.in_channels, pipe.unet.config.sample_size, pipe.unet.config.sample_size)
        latents = torch.stack([torch.randn(shape[1:], generator=g) for g in gens]).to(device, pipe.unet.dtype)
        size = pipe.unet.config.sample_size * pipe.vae_scale_factor
        images = pipe(chunk, height=size, width=size, num_inference_steps=steps, guidance_scale=guidance, latents=latents, output_type="pt").images
        out.append((images.clamp(0, 1) * 255).round().to(torch.uint8).cpu())
    return torch.cat(out)


def caption_accuracy(pipe, n: int = 64, seed: int = 2024, steps: int = 25, guidance: float = 4.0) -> CaptionAccuracy:
    """Fraction of generated images whose object colour and shape match the prompt."""
    scenes = eval_prompts(n, seed)
    prompts = [s.caption(size=False, position=False) for s in scenes]
    images = generate(pipe, prompts, seed, steps, guidance)
    colour = shape = 0
    failures = []
    for scene, prompt, image in zip(scenes, prompts, images):
        verdict = judge(image, scene.colour, scene.shape, scene.background)
        colour += verdict.colour_ok
        shape += verdict.shape_ok
        if not (verdict.colour_ok and verdict.shape_ok):
            failures.append(f"{prompt!r}: saw {verdict.colour} {verdict.shape}")
    return CaptionAccuracy(colour / n, shape / n, n, failures)


@torch.no_grad()
def style_improvement(pipe, adapter: LoraAdapter, images: Tensor, captions: list[str], alphas_cumprod: Tensor, repeats: int = 4) -> tuple[float, float]:
    """(loss without, loss with) the adapter on held-out styled images (uint8) and captions; ``pipe``
    holds the world's unet, text_encoder, vae and tokenizer."""
    from studio.world.data import tokenize

    unet, text_encoder, vae, tokenizer = pipe.unet, pipe.text_encoder, pipe.vae, pipe.tokenizer
    device = unet.device
    latents = encode_latents(vae, images.to(device)) * vae.config.scaling_factor
    states = text_encoder(tokenize(tokenizer, captions).long().to(device))[0]
    without = validation_loss(unet, latents, states, alphas_cumprod, repeats=repeats)
    with merged(component_modules(unet), adapter):
        with_lora = validation_loss(unet, latents, states, alphas_cumprod, repeats=repeats)
    return without, with_lora
