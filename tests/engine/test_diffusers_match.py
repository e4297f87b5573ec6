"""Our merged images match diffusers' own ``load_lora_weights`` path for the same kohya file."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from studio.engine import GenerateRequest
from tests.engine.conftest import attention_layers, random_lora

STEPS = 4
SEED = 7


def kohya_file(adapter, path) -> None:
    """Write kohya keys (``lora_unet_...``, ``lora_te_...``) by hand: the test owns its reference."""
    tensors = {}
    for module, layer in adapter.lora_layers.items():
        component, _, rest = module.partition(".")
        stem = ("lora_unet_" if component == "unet" else "lora_te_") + rest.replace(".", "_")
        tensors[f"{stem}.lora_down.weight"] = layer.down.contiguous()
        tensors[f"{stem}.lora_up.weight"] = layer.up.contiguous()
        tensors[f"{stem}.alpha"] = torch.tensor(layer.alpha)
    save_file(tensors, str(path))


def diffusers_image(pipeline_dir, lora_path, scale: float) -> np.ndarray:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(pipeline_dir, safety_checker=None, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(lora_path))
    pipe.set_adapters(pipe.get_active_adapters(), adapter_weights=[scale])
    generator = [torch.Generator("cpu").manual_seed(SEED)]
    return pipe(prompt=["a red circle"], num_inference_steps=STEPS, guidance_scale=7.5, generator=generator, output_type="np").images[0]


@pytest.mark.parametrize("scale", [1.0, 0.6])
def test_merged_lora_matches_diffusers_load_lora_weights(engine, tiny_pipeline_dir, tmp_path, scale):
    adapter = random_lora(engine, "match", 40, layers=attention_layers(engine), rank=4, alpha=2.0, magnitude=0.3)
    path = tmp_path / "match.safetensors"
    kohya_file(adapter, path)
    reference = diffusers_image(tiny_pipeline_dir, path, scale)
    ours = engine.generate(GenerateRequest(prompt="a red circle", adapters=[(adapter, scale)], seed=SEED, steps=STEPS))
    bare = engine.generate(GenerateRequest(prompt="a red circle", seed=SEED, steps=STEPS))[0].pixels
    assert np.abs(reference - bare).max() > 0.05, "the LoRA should visibly change the image"
    np.testing.assert_allclose(ours[0].pixels, reference, atol=2e-4)


def test_lora_file_spec_loads_through_studio_formats(engine, tiny_pipeline_dir, tmp_path):
    formats = pytest.importorskip("studio.formats")
    if not hasattr(formats, "load_adapter"):
        pytest.skip("studio.formats.load_adapter not there yet")
    adapter = random_lora(engine, "spec", 41, layers=attention_layers(engine), magnitude=0.3)
    path = tmp_path / "spec.safetensors"
    kohya_file(adapter, path)
    reference = diffusers_image(tiny_pipeline_dir, path, 0.8)
    ours = engine.generate(GenerateRequest(prompt="a red circle", adapters=[f"{path}:0.8"], seed=SEED, steps=STEPS))[0]
    np.testing.assert_allclose(ours.pixels, reference, atol=2e-4)
    assert ours.parameters.adapters == [("spec", 0.8)]
