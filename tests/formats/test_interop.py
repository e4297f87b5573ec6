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
    ranks = {m: config["unet.rank_pattern"].get(f"^{m}", config["unet.r"]) for m in config["unet.target_modules"]}
    alphas = {m: config["unet.alpha_pattern"].get(f"^{m}", config["unet.lora_alpha"]) for m in config["unet.target_modules"]}
    assert alphas == ranks and len(set(ranks.values())) > 1  # alpha = rank everywhere: the scale is in lora_B


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


# -- FLUX.1 ---------------------------------------------------------------------------------------

FLUX_TOP = ("transformer.x_embedder", "transformer.context_embedder", "transformer.time_text_embed.timestep_embedder.linear_1",
            "transformer.norm_out.linear", "transformer.proj_out")
FLUX_T5 = ("text_encoder_2.encoder.block.0.layer.0.SelfAttention.q", "text_encoder_2.encoder.block.0.layer.1.DenseReluDense.wi_0")
FLUX_SOME = FLUX_TOP + FLUX_T5 + ("transformer.single_transformer_blocks.0.attn.to_q", "transformer.single_transformer_blocks.0.attn.to_k",
                                  "text_encoder.encoder.layers.0.self_attn.q_proj", "text_encoder.encoder.layers.0.self_attn.out_proj",
                                  "text_encoder.encoder.layers.0.mlp.fc1")
FLUX_MIX = lambda m: m.startswith(("transformer.transformer_blocks.0.", "transformer.single_transformer_blocks.1.")) or m in FLUX_SOME  # noqa: E731
FINAL_LAYER = {"transformer.norm_out.linear", "transformer.proj_out"}


@pytest.fixture(scope="module")
def flux_adapter():
    """32 layers on real FLUX.1-dev shapes: whole blocks, a half-filled linear1, swapped norm_out, CLIP-L, T5.

    Ranks 2-4 and alphas r/2 or 3r per layer, so fused qkv / linear1 pieces have their own downs
    and scales (the kohya export stacks them block-diagonally with the scales multiplied in).
    """
    adapter = _adapter("flux1", FLUX_MIX)
    assert len(adapter.lora_layers) == 32
    return adapter


def test_kohya_flux_names_follow_lora_flux():
    from studio.formats.flux_consumers import bfl_modules, kohya_flux_names

    tree = architecture_tree("flux1")
    names = kohya_flux_names(tree, bfl_modules(tree), t5=False)
    assert names["lora_unet_double_blocks_0_img_attn_qkv"] == "double_blocks.0.img_attn.qkv"  # fused: one LoRA module
    assert names["lora_unet_single_blocks_37_linear1"] == "single_blocks.37.linear1"
    assert names["lora_unet_guidance_in_out_layer"] == "guidance_in.out_layer"  # in_dims layers, created from weights
    assert names["lora_te1_text_model_encoder_layers_11_mlp_fc2"] == "text_encoder.encoder.layers.11.mlp.fc2"
    assert not any("final_layer" in n or n.startswith("lora_te3") for n in names)
    assert len(names) == 19 * 10 + 38 * 3 + 8 + 12 * 6
    with_t5 = kohya_flux_names(tree, bfl_modules(tree), t5=True)
    assert with_t5["lora_te3_encoder_block_23_layer_1_DenseReluDense_wi_1"] == "text_encoder_2.encoder.block.23.layer.1.DenseReluDense.wi_1"
    assert len(with_t5) == len(names) + 24 * 7


def test_kohya_flux_refuses_a_missing_alpha_and_a_wrong_shape():
    from studio.formats.flux_consumers import kohya_flux_reads

    tree = architecture_tree("flux1")
    stem = "lora_unet_double_blocks_0_img_attn_qkv"
    tensors = {f"{stem}.lora_down.weight": torch.randn(2, 3072), f"{stem}.lora_up.weight": torch.randn(9216, 2)}
    assert "KeyError" in kohya_flux_reads(tensors, tree).refused
    tensors[f"{stem}.alpha"] = torch.tensor(1.0)
    reading = kohya_flux_reads(tensors, tree)
    assert reading.refused is None and sorted(reading.deltas) == [f"transformer.transformer_blocks.0.attn.to_{p}" for p in "kqv"]
    tensors[f"{stem}.lora_up.weight"] = torch.randn(3072, 2)  # a to_q-sized up on the fused qkv
    assert "size mismatch" in kohya_flux_reads(tensors, tree).refused


def test_comfyui_flux_slots_follow_flux_to_diffusers():
    from studio.formats.flux_consumers import Slot, bfl_modules, comfyui_flux_key_map

    tree = architecture_tree("flux1")
    keys = comfyui_flux_key_map(tree, bfl_modules(tree))
    assert keys["transformer.transformer_blocks.0.attn.to_v"] == Slot("double_blocks.0.img_attn.qkv", 6144, 3072)
    assert keys["transformer.transformer_blocks.0.attn.add_k_proj"] == Slot("double_blocks.0.txt_attn.qkv", 3072, 3072)
    assert keys["transformer.single_transformer_blocks.3.proj_mlp"] == Slot("single_blocks.3.linear1", 9216, 12288)
    assert keys["diffusion_model.single_blocks.3.linear1_qkv"] == Slot("single_blocks.3.linear1", 0, 9216)
    assert keys["transformer.norm_out.linear"] == Slot("final_layer.adaLN_modulation.1", swap=True)
    assert keys["lora_unet_final_layer_adaLN_modulation_1"] == Slot("final_layer.adaLN_modulation.1")
    assert keys["lora_te2_encoder_block_0_layer_0_SelfAttention_q"] == keys["lora_te3_encoder_block_0_layer_0_SelfAttention_q"]
    assert not any(k.startswith("text_encoder_2.") for k in keys)  # diffusers-named T5 layers: no key
    assert keys["text_encoder.text_model.encoder.layers.0.self_attn.q_proj"] == Slot("text_encoder.encoder.layers.0.self_attn.q_proj")


def test_comfyui_flux_final_layer_is_swapped_once_either_way():
    """BFL's (shift, scale) under lora_unet_final_layer_*, diffusers' (scale, shift) under transformer.norm_out."""
    from studio.formats.flux_consumers import comfyui_flux_reads

    tree = architecture_tree("flux1")
    down, up = torch.randn(2, 3072, dtype=torch.float64), torch.randn(6144, 2, dtype=torch.float64)
    bfl_up = torch.cat([up[3072:], up[:3072]])
    diffusers_file = {"transformer.norm_out.linear.lora_A.weight": down, "transformer.norm_out.linear.lora_B.weight": up}
    kohya_file = {"lora_unet_final_layer_adaLN_modulation_1.lora_down.weight": down,
                  "lora_unet_final_layer_adaLN_modulation_1.lora_up.weight": bfl_up,
                  "lora_unet_final_layer_adaLN_modulation_1.alpha": torch.tensor(2.0)}
    for tensors in (diffusers_file, kohya_file):
        left, right = comfyui_flux_reads(tensors, tree).deltas["transformer.norm_out.linear"]
        assert torch.allclose(left @ right, up @ down)


FLUX_CASES = [  # (tool, layout written by the studio, layers the tool does not apply, and why)
    ("kohya", "kohya", FINAL_LAYER),  # kohya's FLUX network has no LoRA module on final_layer
    ("comfyui", "kohya", set()),
    ("diffusers", "kohya", set(FLUX_T5) | set(FLUX_TOP)),  # no T5 loader; its kohya converter drops in / final layers
    ("diffusers", "diffusers", set(FLUX_T5)),
    ("comfyui", "diffusers", set(FLUX_T5)),  # no text_encoder_2.* key in ComfyUI's map
]


@pytest.mark.parametrize("tool, layout, missing", FLUX_CASES, ids=[f"{t}-reads-{l}" for t, l, _ in FLUX_CASES])
def test_flux_exports_read_exactly(tmp_path, flux_adapter, tool, layout, missing):
    expected = adapter_deltas(flux_adapter)
    path = save_adapter(flux_adapter, tmp_path / f"{layout}.safetensors", layout)
    reading = read_as(tool, path, architecture_tree("flux1"))
    check = fidelity(reading, expected)
    assert reading.refused is None and not check.wrong
    assert set(expected) - set(reading.deltas) == missing
    assert check.applied == check.expected - len(missing) == 32 - len(missing)
    assert check.max_error < 1e-6, check.summary()


def test_kohya_written_flux_file_read_by_kohya_comfyui_diffusers(tmp_path):
    """sd-scripts' own layout as published (bf16, split_qkv: block-diagonal up, in_dims layers, CLIP-L, T5), and its
    diffusers export: a scale of 1/6 baked into bf16 ups would be 2e-3 off, the export keeps those ups in float32."""
    from tests.formats.flux_files import FluxParams, kohya_flux_state_dict

    small = FluxParams(depth=1, depth_single_blocks=1, clip_layers=1, t5_layers=1)
    state = kohya_flux_state_dict(small, rank=2, alpha=1.0, split_qkv=True, text_encoders=("clip", "t5"), in_layers=True)
    save_file(state, tmp_path / "kohya.safetensors")
    adapter = load_adapter(tmp_path / "kohya.safetensors", "flux1")
    exported = save_adapter(adapter, tmp_path / "diffusers.safetensors", "diffusers")
    expected, tree = adapter_deltas(adapter), architecture_tree("flux1")
    in_layers = {m for m in expected if ".time_text_embed." in m or m.endswith(("x_embedder", "context_embedder"))}
    t5 = {m for m in expected if m.startswith("text_encoder_2.")}
    assert len(expected) == 14 + 6 + 8 + 6 + 7 and len(in_layers) == 8
    cases = [("kohya", tmp_path / "kohya.safetensors", set(), 1e-6), ("comfyui", tmp_path / "kohya.safetensors", set(), 1e-6),
             ("diffusers", tmp_path / "kohya.safetensors", in_layers | t5, 1e-2),  # its converter bakes alpha / rank into bf16
             ("comfyui", exported, t5, 1e-6), ("diffusers", exported, t5, 1e-6)]
    for tool, path, missing, tolerance in cases:
        reading = read_as(tool, path, tree)
        check = fidelity(reading, expected)
        assert set(expected) - set(reading.deltas) == missing and not check.wrong, (tool, path.name)
        assert check.max_error < tolerance, (tool, path.name, check.summary())


def test_peft_written_flux_file_takes_its_scale_from_adapter_config(tmp_path):
    """peft's save_pretrained on FluxTransformer2DModel: lora_alpha and alpha_pattern live in adapter_config.json."""
    from diffusers import FluxTransformer2DModel
    from peft import LoraConfig, get_peft_model

    from studio.formats.consumers import _hollow, _peft_deltas, Reading

    with torch.device("meta"):  # FLUX.1-dev widths, one block of each kind: names of the flux1 tree
        transformer = FluxTransformer2DModel(num_layers=1, num_single_layers=1, guidance_embeds=True)
    _hollow(transformer)
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=2, init_lora_weights=False, target_modules=["to_q", "add_k_proj", "proj_mlp", "norm_out.linear"],
                        alpha_pattern={"add_k_proj": 6})
    model = get_peft_model(transformer, config)
    model.save_pretrained(tmp_path / "peft")
    theirs = Reading("peft")
    _peft_deltas("transformer", model.base_model.model, "default", theirs)
    adapter = load_adapter(tmp_path / "peft" / "adapter_model.safetensors", "flux1")
    assert adapter.lora_layers["transformer.transformer_blocks.0.attn.add_k_proj"].alpha == 6
    check = fidelity(theirs, adapter_deltas(adapter))
    assert check.applied == check.expected == 5 and check.max_error < 1e-6


def test_flux_export_for_picks_the_layout_each_tool_reads(tmp_path, flux_adapter):
    done = export_for(flux_adapter, tmp_path / "comfy.safetensors", "comfyui")
    assert done.layout == "kohya" and done.checks["comfyui"].applied == 32 and done.checks["comfyui"].max_error < 1e-6
    assert any("lora_unet_double_blocks_0_img_attn_qkv" in k for k in load_file(done.path))
    assert all(m.level == "info" for m in done.messages)
    assert "read by kohya sd-scripts" in done.messages[-1].text and "A1111 has no FLUX loader" in done.messages[-1].text
    kohya = export_for(flux_adapter, tmp_path / "kohya.safetensors", "kohya")
    assert kohya.layout == "kohya" and kohya.checks["kohya"].applied == 30  # final_layer: no module in kohya's network
    assert any(m.level == "warning" and "applies 30 of 32" in m.text for m in kohya.messages)
    assert export_for(flux_adapter, tmp_path / "d.safetensors", "diffusers", check=()).layout == "diffusers"


def test_flux_a1111_is_not_supported(tmp_path, flux_adapter):
    with pytest.raises(StudioError, match="A1111 has no FLUX.1 loader"):
        export_for(flux_adapter, tmp_path / "a.safetensors", "a1111")
    assert not (tmp_path / "a.safetensors").exists()
    path = save_adapter(flux_adapter, tmp_path / "k.safetensors", "kohya")
    check = fidelity(read_as("a1111", path, architecture_tree("flux1")), adapter_deltas(flux_adapter))
    assert check.unsupported and check.applied == 0 and "A1111 has no FLUX loader" in check.summary()


def test_export_verb_for_each_tool_on_a_flux_file(tmp_path):
    """``studio export IN --for TOOL``: the layout per tool, the message naming who reads it, A1111 refused by name."""
    from studio.verbs.export import ExportRequest, run
    from tests.formats.flux_files import FluxParams, write_kohya_flux

    source = write_kohya_flux(tmp_path / "in.safetensors", p=FluxParams(depth=1, depth_single_blocks=1, clip_layers=1), rank=2)
    layouts = {}
    for tool in ("kohya", "comfyui", "diffusers"):
        result = run(ExportRequest(input=str(source), output=str(tmp_path / f"{tool}.safetensors"), tool=tool))
        layouts[tool] = result.layout
        assert any("the kohya layout (BFL names" in n or "the diffusers layout is read by" in n for n in result.notes), result.notes
    assert layouts == {"kohya": "kohya for kohya", "comfyui": "kohya for comfyui", "diffusers": "diffusers for diffusers"}
    assert any(k.startswith("lora_unet_double_blocks_0_") for k in load_file(tmp_path / "comfyui.safetensors"))
    assert all(k.startswith(("transformer.", "text_encoder.")) for k in load_file(tmp_path / "diffusers.safetensors"))
    with pytest.raises(StudioError, match="A1111 has no FLUX.1 loader.*--for comfyui"):
        run(ExportRequest(input=str(source), output=str(tmp_path / "a1111.safetensors"), tool="a1111"))
    assert not (tmp_path / "a1111.safetensors").exists()
