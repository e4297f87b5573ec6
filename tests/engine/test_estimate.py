"""The request estimator: FLOPs and bytes fitted on the meta device, evaluated before allocating."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from studio.engine import GenerateRequest
from studio.engine.estimate import _unet_inputs
from studio.errors import ConfigError


def test_fitted_flops_hold_at_an_unprobed_size(engine):
    """a + b P + c P^2 is exact for a UNet: the fit equals a counted forward at a size it never saw."""
    from diffusers import UNet2DConditionModel

    side = 32 * engine.pipe.vae_scale_factor  # image pixels of a 32 x 32 latent (the tiny VAE scales by 2, not 8)
    estimate = engine.estimate(GenerateRequest(prompt="x", steps=1, width=side, height=side, guidance=1.0))
    config = dict(engine.pipe.unet.config)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as meta, torch.device("meta"):
        unet(**_unet_inputs(config, 32))
    with torch.no_grad(), FlopCounterMode(display=False) as real:
        engine.pipe.unet(**_unet_inputs(config, 32))  # fused CPU attention is not counted here
    fitted = engine._cost.unet_flops.at(32 * 32)
    assert fitted == pytest.approx(meta.get_total_flops(), rel=1e-3)
    assert real.get_total_flops() <= fitted
    assert estimate.unet_rows == 1 and estimate.latent_pixels == 32 * 32


def test_cost_grows_with_pixels_steps_and_images(engine):
    small = engine.estimate(GenerateRequest(prompt="x", steps=2))
    more_steps = engine.estimate(GenerateRequest(prompt="x", steps=4))
    more_images = engine.estimate(GenerateRequest(prompt="x", steps=2, batch=3))
    huge = engine.estimate(GenerateRequest(prompt="x", steps=2, width=100000, height=100000))
    assert small.unet_rows == 2 and more_images.unet_rows == 6  # classifier-free guidance doubles rows
    assert more_steps.tflop > small.tflop and more_images.peak_bytes > small.peak_bytes
    assert huge.peak_bytes > 1e11 and huge.attention_bytes > huge.activation_bytes  # refusable up front
    assert small.weight_bytes == sum(p.numel() * p.element_size() for n in ("unet", "vae", "text_encoder")
                                     for p in getattr(engine.pipe, n).parameters())


def test_throughput_is_measured_after_a_generation(engine):
    request = GenerateRequest(prompt="x", steps=1)
    engine.estimate(request)
    engine.generate(request)
    assert engine.estimate(request).seconds_from == "measured"


def test_bad_fields_are_refused_before_estimating(engine):
    with pytest.raises(ConfigError, match="guidance"):
        engine.estimate(GenerateRequest(prompt="x", guidance=float("inf")))
    with pytest.raises(ConfigError, match="width"):
        engine.estimate(GenerateRequest(prompt="x", width=30))
