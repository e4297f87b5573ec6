"""`Base` descriptions checked against the pipelines they describe (tiny SDXL, FLUX.1, SD3 from configs)."""

from __future__ import annotations

import inspect

import pytest
import torch
from safetensors.torch import save_file

from studio.bases import BASES, base_for, base_of, load_pipeline, module_tree
from studio.verbs.inspect import InspectRequest, run as inspect_run


@pytest.fixture(scope="module")
def pipelines(tiny_pipeline_dir, tiny_sdxl_dir, tiny_flux_dir, tiny_sd3_dir):
    return {family: load_pipeline(str(folder)) for family, folder in
            (("sd", tiny_pipeline_dir), ("sdxl", tiny_sdxl_dir), ("flux1", tiny_flux_dir), ("sd3", tiny_sd3_dir))}


@pytest.mark.parametrize("family", ["sd", "sdxl", "flux1", "sd3"])
def test_base_describes_its_pipeline(pipelines, family):
    pipe = pipelines[family]
    base = base_of(pipe)
    assert base is BASES[family] and type(pipe).__name__ == base.pipeline_class
    denoiser = getattr(pipe, base.denoiser)
    assert type(denoiser).__name__ == base.denoiser_class
    assert set(base.denoiser_inputs()) <= set(inspect.signature(denoiser.forward).parameters)
    assert all(isinstance(getattr(pipe, name), torch.nn.Module) for name in base.adapter_components + base.text_encoders)
    assert all(getattr(pipe, name) is not None for name in base.tokenizers)
    assert set(base.diffusers_loadable) == set(type(pipe)._lora_loadable_modules)
    assert set(base.kohya_prefixes) <= set(base.adapter_components) | {"unet"}
    assert base.added_time_ids == (denoiser.config.get("addition_embed_type") == "text_time")


def test_guidance_modes():
    assert BASES["flux1"].guidance_for({"guidance_embeds": True}) == "embedded"
    assert BASES["flux1"].guidance_for({"guidance_embeds": False}) == "none"
    assert BASES["sd3"].guidance_for({}) == "cfg" and BASES["sdxl"].guidance == "cfg"
    assert BASES["flux1"].target == BASES["sd3"].target == "flow" and BASES["sd"].target == "scheduler"


@pytest.mark.parametrize("base_id, family", [("sd15", "sd"), ("sdxl", "sdxl"), ("flux1", "flux1"), ("flux1-schnell", "flux1"), ("sd3", "sd3")])
def test_base_for_every_tree(base_id, family):
    assert base_for(module_tree(base_id)) is BASES[family]


def test_folder_trees_know_their_family(tiny_sdxl_dir, tiny_flux_dir, tiny_sd3_dir):
    assert module_tree(str(tiny_sdxl_dir)).family == "sdxl"
    assert module_tree(str(tiny_flux_dir)).family == "flux1"
    assert module_tree(str(tiny_sd3_dir)).family == "sd3"


def test_inspect_with_base_sd3_keeps_a_medium_lora(tmp_path):
    """``--base sd3`` means Large or Medium: a Medium LoRA is kept, not refused as 'another base'."""
    from tests.formats.sd3_files import MMDiTParams, kohya_sd3_state_dict

    save_file(kohya_sd3_state_dict(MMDiTParams(depth=24), rank=1), tmp_path / "m.safetensors")
    info, = inspect_run(InspectRequest([str(tmp_path / "m.safetensors")], base="sd3")).infos
    assert info.error is None and info.base_guess == "SD3.5 Medium" and info.format == "kohya"
