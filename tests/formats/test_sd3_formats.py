"""SD3 / SD3.5 LoRA files (kohya sd-scripts, ComfyUI, diffusers) and the original-name tables of FLUX.1 and SD3.

The tables are checked against diffusers' own single-file converters: every row of every fused /
swapped weight is followed through ``convert_sd3_transformer_checkpoint_to_diffusers`` and
``convert_flux_transformer_checkpoint_to_diffusers`` with marker values (row ids).
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from studio.formats import load_adapter, save_adapter
from studio.formats import flux_keys, sd3_keys
from tests.formats.flux_files import FluxParams, bfl_linears
from tests.formats.sd3_files import SD35_LARGE, TINY_SD3, MMDiTParams, block_linears, embedder_linears, kohya_sd3_state_dict, sai_checkpoint


def _markers(shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Weights of shape (out, 1) holding globally unique row ids (float64 holds them exactly)."""
    markers, start = {}, 0
    for name, shape in shapes.items():
        markers[name] = torch.arange(start, start + shape[0], dtype=torch.float64)[:, None]
        start += shape[0]
    return markers


def _expected_rows(scheme, path: str, markers: dict[str, torch.Tensor], in_features: dict[str, int]) -> torch.Tensor:
    group, index = scheme.locate(path)
    rows = markers[group.original]
    dims = group.dims(rows.shape[0], in_features[group.original])
    piece = torch.split(rows, dims, dim=0)[index]
    if scheme.swapped(group.original, rows.shape[0], in_features[group.original]):
        piece = torch.cat(piece.chunk(2, dim=0)[::-1], dim=0)
    return piece


def _check_scheme(scheme, converted: dict[str, torch.Tensor], markers, in_features) -> int:
    checked = 0
    for key, value in converted.items():
        path = key.removesuffix(".weight")
        if not key.endswith(".weight") or value.dim() != 2 or value.shape[1] != 1 or value.dtype != torch.float64:
            continue
        located = scheme.locate(path)
        assert located is not None, f"diffusers module {path} has no original name in the table"
        assert torch.equal(value, _expected_rows(scheme, path, markers, in_features)), path
        checked += 1
    return checked


def test_sd3_tables_follow_diffusers_single_file_converter():
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    p = MMDiTParams(depth=3, dual_attention=(0,))  # SD3.5-Medium widths: a dual block, a plain one, the pre-only last
    shapes = {**block_linears(p), **embedder_linears(p)}
    shapes = {name: shape for name, shape in shapes.items() if len(shape) == 2}
    markers = _markers(shapes)
    converted = convert_sd3_transformer_checkpoint_to_diffusers(sai_checkpoint(p, markers))
    checked = _check_scheme(sd3_keys.SCHEME, converted, markers, {name: shape[1] for name, shape in shapes.items()})
    assert checked == sum(len(sd3_keys.SCHEME.group(n).pieces) for n in shapes)


def _bfl_checkpoint(p: FluxParams) -> tuple[dict, dict]:
    h = p.hidden_size
    shapes = {**bfl_linears(p, in_layers=True), "final_layer.linear": (p.in_channels, h), "final_layer.adaLN_modulation.1": (2 * h, h)}
    markers = _markers(shapes)
    checkpoint = {}
    for name, shape in shapes.items():
        checkpoint[f"{name}.weight"], checkpoint[f"{name}.bias"] = markers[name], torch.zeros(shape[0])
    for i in range(p.depth):
        for stream in ("img", "txt"):
            for norm in ("query_norm", "key_norm"):
                checkpoint[f"double_blocks.{i}.{stream}_attn.norm.{norm}.scale"] = torch.zeros(128)
    for i in range(p.depth_single_blocks):
        for norm in ("query_norm", "key_norm"):
            checkpoint[f"single_blocks.{i}.norm.{norm}.scale"] = torch.zeros(128)
    return checkpoint, {"shapes": shapes, "markers": markers}


def test_flux_tables_follow_diffusers_single_file_converter():
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    checkpoint, info = _bfl_checkpoint(FluxParams(depth=2, depth_single_blocks=2))
    converted = convert_flux_transformer_checkpoint_to_diffusers(checkpoint)
    shapes = info["shapes"]
    checked = _check_scheme(flux_keys.SCHEME, converted, info["markers"], {name: shape[1] for name, shape in shapes.items()})
    assert checked == sum(len(flux_keys.SCHEME.group(n).pieces) for n in shapes)


def test_kohya_sd3_medium_and_large_pick_their_tree(tmp_path):
    """``--base sd3`` stands for SD3.5 Large and Medium: each file lands on the one it fits, exactly round-tripped."""
    for params, arch in ((MMDiTParams(), "sd3.5-medium"), (SD35_LARGE, "sd3.5-large")):
        state = kohya_sd3_state_dict(params, rank=1, embedders=True)
        path = tmp_path / f"{arch}.safetensors"
        save_file(state, path)
        adapter = load_adapter(path, "sd3")
        assert adapter.base_arch == arch and not any("skipped" in n for n in adapter.notes), adapter.notes
        assert adapter.source_format == "kohya"
        save_adapter(adapter, tmp_path / "back.safetensors", "kohya")
        back = load_file(tmp_path / "back.safetensors")
        assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)


def test_comfyui_sd3_layout(tmp_path):
    state = kohya_sd3_state_dict(MMDiTParams(), rank=1)
    comfy = {}
    for key, value in state.items():
        stem, _, part = key.partition(".")
        comfy[f"diffusion_model.{sd3_keys.SCHEME.dotted(stem.removeprefix('lora_unet_'))}.{part}"] = value
    save_file(comfy, tmp_path / "c.safetensors")
    adapter = load_adapter(tmp_path / "c.safetensors")
    assert adapter.base_arch == "sd3.5-medium" and adapter.source_format == "comfyui"


def test_kohya_sd3_into_tiny_pipeline_equals_diffusers_mapping_of_its_deltas(tmp_path, tiny_sd3_dir):
    """load_lora_weights of the studio's export changes each weight by what diffusers' single-file converter
    makes of the same LoRA's deltas in SAI naming (fused qkv, attn2, pre-only and final adaLN swaps)."""
    from diffusers import StableDiffusion3Pipeline
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    state = kohya_sd3_state_dict(TINY_SD3, rank=2, alpha=3.0, embedders=True)
    save_file(state, tmp_path / "k.safetensors")
    adapter = load_adapter(tmp_path / "k.safetensors", str(tiny_sd3_dir))
    assert not any("skipped" in note for note in adapter.notes)
    exported = save_adapter(adapter, tmp_path / "d.safetensors", "diffusers")
    deltas = {}
    for name in {**block_linears(TINY_SD3), **embedder_linears(TINY_SD3)}:
        stem = f"lora_unet_{name.replace('.', '_')}"
        down, up = state[f"{stem}.lora_down.weight"], state[f"{stem}.lora_up.weight"]
        deltas[name] = (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:]) * 3.0 / 2
    expected = convert_sd3_transformer_checkpoint_to_diffusers(sai_checkpoint(TINY_SD3, deltas))
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_dir, local_files_only=True)
    before = {n: m.weight.detach().clone() for n, m in pipe.transformer.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    pipe.load_lora_weights(str(exported))
    pipe.fuse_lora(components=["transformer"])
    for name, weight in before.items():
        module = pipe.transformer.get_submodule(name)
        after = (module.base_layer if hasattr(module, "base_layer") else module).weight.detach()
        assert torch.allclose(after - weight, expected[f"{name}.weight"].to(after.dtype), atol=1e-6), name


@pytest.mark.parametrize("family_file", ["sd3"])
def test_sd3_diffusers_export_reads_back_exactly(tmp_path, tiny_sd3_dir, family_file):
    save_file(kohya_sd3_state_dict(TINY_SD3, rank=2, embedders=True), tmp_path / "k.safetensors")
    adapter = load_adapter(tmp_path / "k.safetensors", str(tiny_sd3_dir))
    save_adapter(adapter, tmp_path / "d.safetensors", "diffusers")
    again = load_adapter(tmp_path / "d.safetensors", str(tiny_sd3_dir))
    assert again.base_arch == "sd3-custom" and set(again.lora_layers) == set(adapter.lora_layers)
    assert all(torch.allclose(again.delta(m), adapter.delta(m), atol=1e-6) for m in adapter.lora_layers)
