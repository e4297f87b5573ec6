"""BASE resolution: module trees without weights, pipelines from folders, clear errors offline."""

from __future__ import annotations

import pytest

from studio.bases import architecture_tree, load_pipeline, module_tree, pipeline_tree
from studio.errors import BaseNotFoundError


@pytest.mark.parametrize("arch, modules, components", [
    ("sd15", 354, ["text_encoder", "unet"]),
    ("sd2", 420, ["text_encoder", "unet"]),
    ("sdxl", 1059, ["text_encoder", "text_encoder_2", "unet"]),
])
def test_architecture_trees_are_built_without_weights(arch, modules, components):
    tree = architecture_tree(arch)
    assert len(tree.modules) == modules and tree.components == components
    to_k = tree.modules["unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"]
    assert to_k.weight_shape == ((640, {"sd15": 768, "sd2": 1024, "sdxl": 2048}[arch]))


def test_folder_tree_matches_loaded_pipeline(tiny_pipeline_dir):
    tree = module_tree(str(tiny_pipeline_dir))
    live = pipeline_tree(load_pipeline(str(tiny_pipeline_dir)))
    assert tree.modules == live.modules and tree.arch == "custom"


def test_bad_bases_say_what_is_wrong(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BaseNotFoundError, match="offline"):
        load_pipeline("someone/some-model")
    with pytest.raises(BaseNotFoundError, match="no model_index.json"):
        module_tree(str(tmp_path))
    with pytest.raises(BaseNotFoundError, match="no such folder or file"):
        module_tree(str(tmp_path / "missing"))
    checkpoint = tmp_path / "model.ckpt"
    checkpoint.write_bytes(b"\x80\x04junk")
    with pytest.raises(BaseNotFoundError, match="pickle"):
        load_pipeline(str(checkpoint))
    with pytest.raises(BaseNotFoundError, match="architecture without weights"):
        load_pipeline("sdxl")


@pytest.mark.parametrize("base, arch, components", [
    ("flux1", "flux1", ["text_encoder", "text_encoder_2", "transformer"]),
    ("sd3", "sd3.5-large", ["text_encoder", "text_encoder_2", "text_encoder_3", "transformer"]),
    ("sd3.5-medium", "sd3.5-medium", ["text_encoder", "text_encoder_2", "text_encoder_3", "transformer"]),
])
def test_transformer_bases_resolve_to_stored_trees(base, arch, components):
    tree = module_tree(base)
    assert tree.arch == arch and tree.components == components


def test_single_file_transformer_checkpoints_are_named_not_loaded(tmp_path):
    import torch
    from safetensors.torch import save_file

    flux = tmp_path / "flux1-dev.safetensors"
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(9, 3), "guidance_in.in_layer.weight": torch.zeros(3, 2)}, flux)
    assert module_tree(str(flux)).arch == "flux1"
    with pytest.raises(BaseNotFoundError, match="diffusers pipeline folder"):
        load_pipeline(str(flux))
    sd3 = tmp_path / "sd3.5_medium.safetensors"
    save_file({"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": torch.zeros(4608, 1536)}, sd3)
    assert module_tree(str(sd3)).arch == "sd3.5-medium"
    with pytest.raises(BaseNotFoundError, match="architecture without weights"):
        load_pipeline("flux1")
