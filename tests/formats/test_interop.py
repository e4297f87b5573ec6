"""Exports every tool loads exactly (issue 19), checked with each consumer's key rules.

The consumer models (``studio.formats.consumers``) reproduce kohya sd-scripts' LoRA network,
ComfyUI's key map, A1111's Lora extension and diffusers' own loader; these tests pin the rules
read from their source and check the studio's exports against all four.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from studio.adapters.lora import LoraAdapter, LoraLayer
from studio.bases import architecture_tree
from studio.errors import StudioError
from studio.formats import export_for, load_adapter, save_adapter
from studio.formats.consumers import (
    a1111_compvis_name, a1111_reads, adapter_deltas, comfyui_key_map, comfyui_reads, fidelity, kohya_network_names,
    kohya_reads, read_as,
)
from studio.formats.writer import kohya_hashes


def _adapter(arch: str, predicate, rank: int = 2, seed: int = 0, mixed_alpha: bool = True) -> LoraAdapter:
    tree = architecture_tree(arch)
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for i, (module, info) in enumerate(m for m in tree.modules.items() if predicate(m[0])):
        out, *rest = info.weight_shape
        r = rank + (i % 3 if mixed_alpha else 0)
        down = torch.randn(r, *rest, generator=g) * 0.1
        up = torch.randn(out, r, *([1, 1] if len(rest) == 3 else []), generator=g) * 0.1
        layers[module] = LoraLayer(down, up, float(r) / 2 if not mixed_alpha or i % 2 else float(r) * 3)
    return LoraAdapter("t", layers, {"ss_network_dim": str(rank), "sshs_model_hash": "stale"}, base_arch=arch)


SD15_MIX = lambda m: any(p in m for p in ("attn1.to_q", "attn2.to_out.0", "proj_in", "resnets.0.conv1", "resnets.1.time_emb_proj",  # noqa: E731
                                          "downsamplers.0.conv", "upsamplers.0.conv", "self_attn.q_proj", "mlp.fc2"))


SDXL_MIX = lambda m: (SD15_MIX(m) and not m.startswith("text_encoder_2")) or ("text_encoder_2" in m and "layers.3." in m)  # noqa: E731


def test_kohya_names_follow_kohya_unets():
    sd15, sdxl = kohya_network_names(architecture_tree("sd15")), kohya_network_names(architecture_tree("sdxl"))
    assert sd15["lora_unet_down_blocks_0_resnets_0_conv1"] == "unet.down_blocks.0.resnets.0.conv1"  # SD1: diffusers names
    assert sdxl["lora_unet_input_blocks_1_0_in_layers_2"] == "unet.down_blocks.0.resnets.0.conv1"  # SDXL: SGM names
    assert sdxl["lora_unet_output_blocks_2_2_conv"] == "unet.up_blocks.0.upsamplers.0.conv"
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in sd15 and "lora_te2_text_model_encoder_layers_31_mlp_fc2" in sdxl
    assert not any("conv_in" in n or "time_embedding" in n for n in sd15)  # not targeted by kohya's network
    assert len(sdxl) == 1052


def test_kohya_refuses_2d_conv_factors_and_reads_the_studio_4d_ones(tmp_path):
    tree = architecture_tree("sd15")
    stem = "lora_unet_down_blocks_0_resnets_0_conv1"
    flat = {f"{stem}.lora_down.weight": torch.randn(4, 2880), f"{stem}.lora_up.weight": torch.randn(320, 4)}
    assert "size mismatch" in kohya_reads(flat, tree).refused
    save_file(flat, tmp_path / "flat.safetensors")
    adapter = load_adapter(tmp_path / "flat.safetensors", "sd15")
    written = load_file(save_adapter(adapter, tmp_path / "fixed.safetensors", "kohya"))
    assert written[f"{stem}.lora_down.weight"].shape == (4, 320, 3, 3)
    assert kohya_reads(written, tree).refused is None


def test_comfyui_key_rules():
    keys = comfyui_key_map(architecture_tree("sd15"))
    q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    assert keys[f"unet.{q.replace('.to_q', '.processor.to_q')}"] == f"unet.{q}"  # diffusers attention via processor names
    assert f"unet.{q}" not in keys  # ... so diffusers' new attention keys are not read
    assert keys["unet.down_blocks.0.attentions.0.proj_in"] == "unet.down_blocks.0.attentions.0.proj_in"
    assert keys["lora_unet_input_blocks_1_1_proj_in"] == keys["lora_unet_down_blocks_0_attentions_0_proj_in"]
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj" in keys


def test_comfyui_scale_is_one_without_alpha_and_alpha_over_rank_with_it():
    tree = architecture_tree("sd15")
    stem = "lora_unet_down_blocks_0_attentions_0_proj_in"
    down, up = torch.randn(2, 320, 1, 1), torch.randn(320, 2, 1, 1)
    plain = comfyui_reads({f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up}, tree)
    scaled = comfyui_reads({f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up, f"{stem}.alpha": torch.tensor(1.0)}, tree)
    (left1, _), (left2, _) = plain.deltas["unet.down_blocks.0.attentions.0.proj_in"], scaled.deltas["unet.down_blocks.0.attentions.0.proj_in"]
    assert torch.allclose(left2, left1 * 0.5)


def test_a1111_maps_sdxl_diffusers_upsampler_to_no_module():
    assert a1111_compvis_name("lora_unet_up_blocks_0_upsamplers_0_conv") == "diffusion_model_output_blocks_2_1_conv"
    tree = architecture_tree("sdxl")
    tensors = {"lora_unet_up_blocks_0_upsamplers_0_conv.lora_down.weight": torch.randn(2, 1280, 3, 3),
               "lora_unet_up_blocks_0_upsamplers_0_conv.lora_up.weight": torch.randn(1280, 2, 1, 1)}
    assert not a1111_reads(tensors, tree).deltas  # what the studio used to write for SDXL
    sgm = {k.replace("up_blocks_0_upsamplers_0_conv", "output_blocks_2_2_conv"): v for k, v in tensors.items()}
    assert list(a1111_reads(sgm, tree).deltas) == ["unet.up_blocks.0.upsamplers.0.conv"]


@pytest.mark.parametrize("tool", ["kohya", "comfyui", "a1111", "diffusers"])
def test_sd15_export_for_each_tool_is_exact(tmp_path, tool):
    adapter = _adapter("sd15", SD15_MIX)
    done = export_for(adapter, tmp_path / f"{tool}.safetensors", tool)
    check = done.checks[tool]
    assert check.applied == check.expected == len(adapter.lora_layers) and check.max_error < 1e-5
    assert done.layout == ("diffusers" if tool == "diffusers" else "kohya")
    assert all(m.level == "info" for m in done.messages)


@pytest.mark.parametrize("tool", ["kohya", "comfyui", "a1111"])
def test_sdxl_kohya_layout_is_exact_for_kohya_comfyui_a1111(tmp_path, tool):
    adapter = _adapter("sdxl", SDXL_MIX)
    done = export_for(adapter, tmp_path / f"{tool}.safetensors", tool)
    check = done.checks[tool]
    assert check.applied == check.expected == len(adapter.lora_layers) and check.max_error < 1e-5
    keys = load_file(done.path)
    assert any(k.startswith("lora_unet_input_blocks_") for k in keys) and not any("down_blocks" in k for k in keys)


@pytest.mark.slow
def test_sdxl_layouts_read_by_diffusers(tmp_path):
    """The diffusers layout is exact. From the kohya layout diffusers 0.42 (with transformers 5)
    drops text-encoder layers whose rank is not the most common one: its rank_pattern keys keep
    CLIP's ``text_model.`` level, which transformers 5 module names no longer have; UNet layers are exact."""
    adapter = _adapter("sdxl", SDXL_MIX)
    expected = adapter_deltas(adapter)
    tree = architecture_tree("sdxl")
    check = fidelity(read_as("diffusers", save_adapter(adapter, tmp_path / "d.safetensors", "diffusers"), tree), expected)
    assert check.applied == check.expected and check.max_error < 1e-5
    unet = {m: d for m, d in expected.items() if m.startswith("unet.")}
    check = fidelity(read_as("diffusers", save_adapter(adapter, tmp_path / "k.safetensors", "kohya"), tree), unet)
    assert check.applied == check.expected and check.max_error < 1e-5


def test_diffusers_layout_bakes_the_scale_so_comfyui_reads_right_values(tmp_path):
    adapter = _adapter("sd15", SD15_MIX)
    path = save_adapter(adapter, tmp_path / "d.safetensors", "diffusers")
    check = fidelity(read_as("comfyui", path, architecture_tree("sd15")), adapter_deltas(adapter))
    assert 0 < check.applied < check.expected and check.max_error < 1e-5  # fewer layers, never wrong values
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        config = json.loads(handle.metadata()["lora_adapter_metadata"])
    ranks = {m: config["unet.rank_pattern"].get(m, config["unet.r"]) for m in config["unet.target_modules"]}
    alphas = {m: config["unet.alpha_pattern"].get(m, config["unet.lora_alpha"]) for m in config["unet.target_modules"]}
    assert alphas == ranks  # alpha = rank everywhere: the scale is in lora_B


def test_a1111_cannot_apply_a_lone_openclip_q_proj_and_export_for_says_so(tmp_path):
    adapter = _adapter("sdxl", lambda m: m.startswith("text_encoder_2.") and m.endswith("layers.0.self_attn.q_proj") or "attn1.to_q" in m)
    done = export_for(adapter, tmp_path / "a.safetensors", "a1111")
    assert done.checks["a1111"].applied == done.checks["a1111"].expected - 1
    assert any(m.level == "warning" and "A1111 applies" in m.text for m in done.messages)


def test_export_for_refuses_unknown_tool(tmp_path):
    with pytest.raises(StudioError, match="--for must be one of"):
        export_for(_adapter("sd15", SD15_MIX), tmp_path / "x.safetensors", "invokeai")


def test_kohya_export_hashes_are_kohyas_and_fresh(tmp_path):
    from safetensors import safe_open

    adapter = _adapter("sd15", SD15_MIX)
    path = save_adapter(adapter, tmp_path / "k.safetensors", "kohya")
    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    assert metadata["sshs_model_hash"] != "stale"
    assert (metadata["sshs_model_hash"], metadata["sshs_legacy_hash"]) == kohya_hashes(tensors, metadata)
    assert len(metadata["sshs_model_hash"]) == 64 and len(metadata["sshs_legacy_hash"]) == 8
    diffusers = save_adapter(adapter, tmp_path / "d.safetensors", "diffusers")
    with safe_open(str(diffusers), "pt") as handle:
        assert "sshs_model_hash" not in handle.metadata()
