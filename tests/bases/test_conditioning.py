"""One denoising step through `studio.bases.conditioning` equals the diffusers pipeline's own step."""

from __future__ import annotations

import pytest
import torch

from studio.bases import BASES, load_pipeline
from studio.bases.conditioning import encode_prompts, native_resolution, noisy_and_target, predict

PROMPT = ["a red circle on a blue background", "a green square"]


def _one_step(pipe, latents, **options):
    generator = torch.Generator().manual_seed(0)
    return pipe(PROMPT, num_inference_steps=1, output_type="latent", latents=latents.clone(), generator=generator, **options).images


@pytest.mark.parametrize("fixture", ["tiny_flux_dir", "tiny_sd3_dir"])
def test_flow_transformer_step_matches_pipeline(request, fixture):
    pipe = load_pipeline(str(request.getfixturevalue(fixture)))
    torch.manual_seed(0)
    noise = torch.randn(2, pipe.vae.config.latent_channels, 32, 32)
    flux = fixture == "tiny_flux_dir"
    given = pipe._pack_latents(noise, 2, noise.shape[1], 32, 32) if flux else noise
    options = {"height": 32, "width": 32, "max_sequence_length": 16, "guidance_scale": 3.5 if flux else 1.0}
    out = _one_step(pipe, given, **options)
    sigmas, timestep = pipe.scheduler.sigmas, pipe.scheduler.timesteps[0]
    embeds = encode_prompts(pipe, PROMPT, max_sequence_length=16)
    with torch.no_grad():
        velocity = predict(pipe, noise, timestep.expand(2), embeds, guidance_scale=3.5)
    expected = noise + (sigmas[1] - sigmas[0]) * velocity
    if flux:
        expected = pipe._pack_latents(expected, 2, noise.shape[1], 32, 32)
    assert torch.allclose(out, expected, atol=1e-5), float((out - expected).abs().max())


def test_sdxl_step_matches_pipeline(tiny_sdxl_dir):
    pipe = load_pipeline(str(tiny_sdxl_dir))
    torch.manual_seed(0)
    noise = torch.randn(2, 4, 8, 8)
    side = 8 * pipe.vae_scale_factor  # the image size the time ids describe
    out = _one_step(pipe, noise, height=side, width=side, guidance_scale=1.0)
    scheduler = pipe.scheduler
    sigma, sigma_next, timestep = scheduler.sigmas[0], scheduler.sigmas[1], scheduler.timesteps[0]
    x = noise * scheduler.init_noise_sigma
    embeds = encode_prompts(pipe, PROMPT)
    with torch.no_grad():
        eps = predict(pipe, x / (sigma**2 + 1) ** 0.5, timestep.expand(2), embeds)
    expected = x + (sigma_next - sigma) * eps
    assert torch.allclose(out, expected, atol=1e-5), float((out - expected).abs().max())


def test_targets_and_resolutions(tiny_flux_dir, tiny_sdxl_dir):
    flux, sdxl = load_pipeline(str(tiny_flux_dir)), load_pipeline(str(tiny_sdxl_dir))
    assert native_resolution(flux) == flux.default_sample_size * flux.vae_scale_factor
    assert native_resolution(sdxl) == sdxl.unet.config.sample_size * sdxl.vae_scale_factor
    latents, noise = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    noisy, target = noisy_and_target(BASES["flux1"], flux.scheduler, latents, noise, torch.tensor([0, 1000]))
    assert torch.allclose(noisy[0], latents[0]) and torch.allclose(noisy[1], noise[1]) and torch.equal(target, noise - latents)
    noisy, target = noisy_and_target(BASES["sdxl"], sdxl.scheduler, latents, noise, torch.tensor([10, 500]))
    assert torch.equal(target, noise) and not torch.equal(noisy, latents)
