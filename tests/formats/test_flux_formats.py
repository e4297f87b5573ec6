"""FLUX.1 LoRA files: kohya sd-scripts (fused qkv / linear1), ComfyUI, XLabs, ai-toolkit, diffusers.

The reference for every layout is diffusers' own converter (``_convert_kohya_flux_lora_to_diffusers``,
``_convert_xlabs_flux_lora_to_diffusers``) on the same file, compared module by module; files are
written by tests/formats/flux_files.py, which follows sd-scripts' naming on BFL's module list.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from studio.errors import KeyMismatchError, UnsupportedVariantError
from studio.formats import load_adapter, save_adapter
from tests.formats.flux_files import TINY_FLUX, FluxParams, kohya_flux_state_dict, write_kohya_flux
from tests.formats.lowrank import diffusers_pairs, product_error

SMALL_DEV = FluxParams(depth=1, depth_single_blocks=1, clip_layers=1)  # real FLUX.1-dev widths, two blocks


def studio_pairs(adapter) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """file module name -> (A, B * scale) of a studio adapter (the product diffusers' converters bake in)."""
    from studio.formats.keys import file_module_name

    return {file_module_name(module): layer.factors() for module, layer in adapter.lora_layers.items()}


def cloned(state: dict) -> dict:
    """A deep copy: diffusers' converters scale some tensors in place."""
    return {key: value.clone() for key, value in state.items()}


def assert_same_products(ours: dict, theirs: dict, tolerance: float = 1e-6) -> None:
    assert set(ours) == set(theirs), (sorted(set(ours) ^ set(theirs)))[:5]
    errors = {m: product_error(*theirs[m], *ours[m]) for m in theirs}
    worst = max(errors, key=errors.get)
    assert errors[worst] < tolerance, (worst, errors[worst])


@pytest.mark.slow
def test_kohya_flux_dev_file_matches_diffusers_converter(tmp_path):
    """Real FLUX.1-dev shapes, all 19 + 38 blocks, CLIP-L layers, bf16: read, export, equal to diffusers."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    path = write_kohya_flux(tmp_path / "kohya_flux.safetensors", rank=2, alpha=1.0)
    adapter = load_adapter(path, "flux1")
    assert adapter.base_arch == "flux1" and adapter.source_format == "kohya"
    assert len(adapter.lora_layers) == 19 * 14 + 38 * 6 + 12 * 6 and not any("skipped" in n for n in adapter.notes)
    exported = save_adapter(adapter, tmp_path / "diffusers.safetensors", "diffusers")
    again = load_adapter(exported, "flux1")
    theirs = {f"{m}": pair for m, pair in diffusers_pairs(_convert_kohya_flux_lora_to_diffusers(load_file(path))).items()}
    assert_same_products(studio_pairs(again), theirs)
    assert set(diffusers_pairs(load_file(exported))) == set(theirs)  # the export's own keys, module by module


def test_split_qkv_file_reads_as_pieces_and_round_trips(tmp_path):
    """sd-scripts' split_qkv saves downs stacked and a block-diagonal up: read as rank-r pieces, like diffusers."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    state = kohya_flux_state_dict(SMALL_DEV, rank=2, alpha=3.0, split_qkv=True, dtype=torch.float32)
    save_file(state, tmp_path / "split.safetensors")
    adapter = load_adapter(tmp_path / "split.safetensors", "flux1")
    assert adapter.lora_layers["transformer.transformer_blocks.0.attn.to_q"].rank == 2
    assert adapter.lora_layers["transformer.single_transformer_blocks.0.proj_mlp"].rank == 2
    assert any("block-diagonal" in note for note in adapter.notes)
    assert_same_products(studio_pairs(adapter), diffusers_pairs(_convert_kohya_flux_lora_to_diffusers(cloned(state))))
    save_adapter(adapter, tmp_path / "back.safetensors", "kohya")
    back = load_file(tmp_path / "back.safetensors")
    assert set(back) == set(state)
    assert all(torch.equal(back[k], state[k]) for k in state if not k.endswith(".alpha"))
    assert all(float(back[k]) == pytest.approx(float(state[k]), rel=1e-6) for k in state if k.endswith(".alpha"))


def test_kohya_export_merges_fused_layers_exactly(tmp_path):
    """Pieces with their own downs (trained in the studio) merge into one fused LoRA with the same product."""
    adapter = load_adapter(write_kohya_flux(tmp_path / "a.safetensors", p=SMALL_DEV, rank=2, dtype=torch.float32), "flux1")
    to_k = adapter.lora_layers["transformer.transformer_blocks.0.attn.to_k"]
    to_k.down = torch.randn_like(to_k.down)
    del adapter.lora_layers["transformer.single_transformer_blocks.0.proj_mlp"]
    save_adapter(adapter, tmp_path / "k.safetensors", "kohya")
    back = load_adapter(tmp_path / "k.safetensors", "flux1")
    fused = load_file(tmp_path / "k.safetensors")
    assert fused["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"].shape[0] == 6  # downs stacked
    ours = studio_pairs(adapter)
    for module, (down, up) in studio_pairs(back).items():
        if module in ours:
            assert product_error(*ours[module], down, up) < 1e-6, module
        else:  # the missing proj_mlp piece came back as zero rows
            assert module.endswith("proj_mlp") and not up.any()


def test_comfyui_layout_equals_kohya(tmp_path):
    kohya = kohya_flux_state_dict(SMALL_DEV, rank=2, dtype=torch.float32)
    comfy = {}
    for key, value in kohya.items():
        stem, _, part = key.partition(".")
        if stem.startswith("lora_unet_"):
            from studio.formats.flux_keys import SCHEME

            stem = "diffusion_model." + SCHEME.dotted(stem.removeprefix("lora_unet_"))
        comfy[f"{stem}.{part}"] = value
    save_file(kohya, tmp_path / "k.safetensors")
    save_file(comfy, tmp_path / "c.safetensors")
    a, b = load_adapter(tmp_path / "k.safetensors", "flux1"), load_adapter(tmp_path / "c.safetensors", "flux1")
    assert b.source_format == "comfyui" and set(a.lora_layers) == set(b.lora_layers)
    assert all(torch.equal(a.lora_layers[m].up, b.lora_layers[m].up) for m in a.lora_layers)


def _xlabs_state(rank: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    h, state = 3072, {}
    shapes = {"double_blocks.0.processor.qkv_lora1": (3 * h, h), "double_blocks.0.processor.qkv_lora2": (3 * h, h),
              "double_blocks.0.processor.proj_lora1": (h, h), "double_blocks.0.processor.proj_lora2": (h, h),
              "single_blocks.0.processor.qkv_lora": (3 * h, h), "single_blocks.0.processor.proj_lora": (h, 15360)}
    for stem, (out, inp) in shapes.items():
        state[f"{stem}.down.weight"] = torch.randn(rank, inp, generator=generator)
        state[f"{stem}.up.weight"] = torch.randn(out, rank, generator=generator)
    return state


def test_xlabs_layout_matches_diffusers_converter(tmp_path):
    from diffusers.loaders.lora_conversion_utils import _convert_xlabs_flux_lora_to_diffusers

    state = _xlabs_state()
    save_file(state, tmp_path / "x.safetensors")
    adapter = load_adapter(tmp_path / "x.safetensors", "flux1")
    assert adapter.source_format == "xlabs" and len(adapter.lora_layers) == 3 + 3 + 2 + 3 + 1
    assert any("XLabs files carry no alpha" in note for note in adapter.notes)
    assert_same_products(studio_pairs(adapter), diffusers_pairs(_convert_xlabs_flux_lora_to_diffusers(cloned(state))))


def test_ai_toolkit_layouts(tmp_path):
    """ai-toolkit writes diffusers keys (``transformer.`` prefix); its older kohya-like ``lora_transformer_`` keys too."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    adapter = load_adapter(write_kohya_flux(tmp_path / "k.safetensors", p=SMALL_DEV, rank=2, dtype=torch.float32), "flux1")
    save_adapter(adapter, tmp_path / "d.safetensors", "diffusers")
    state = load_file(tmp_path / "d.safetensors")
    unprefixed = {k.removeprefix("transformer."): v for k, v in state.items() if k.startswith("transformer.")}
    save_file(unprefixed, tmp_path / "bare.safetensors")
    bare = load_adapter(tmp_path / "bare.safetensors")
    assert bare.base_arch == "flux1" and len(bare.lora_layers) == sum(m.startswith("transformer.") for m in adapter.lora_layers)
    old = {}
    for module, layer in adapter.lora_layers.items():
        if module.startswith("transformer."):
            stem = "lora_transformer_" + module.removeprefix("transformer.").replace(".", "_")
            old.update({f"{stem}.lora_down.weight": layer.down, f"{stem}.lora_up.weight": layer.up, f"{stem}.alpha": torch.tensor(layer.alpha)})
    save_file(old, tmp_path / "old.safetensors")
    loaded = load_adapter(tmp_path / "old.safetensors")
    assert loaded.source_format == "ai-toolkit" and loaded.base_arch == "flux1"
    assert_same_products(studio_pairs(loaded), {m: p for m, p in studio_pairs(adapter).items() if m.startswith("transformer.")})
    # diffusers' converter for this layout maps attention layers only (others collapse onto the block name)
    attention = {k: v for k, v in old.items() if "_attn_" in k}
    theirs = diffusers_pairs(_convert_kohya_flux_lora_to_diffusers(cloned(attention)))
    assert_same_products({m: p for m, p in studio_pairs(loaded).items() if m in theirs}, theirs)


def test_unplaced_and_foreign_keys_are_never_silent(tmp_path):
    state = kohya_flux_state_dict(SMALL_DEV, rank=2, dtype=torch.float32)
    state["lora_unet_double_blocks_0_img_attn_bogus.lora_down.weight"] = torch.zeros(2, 8)
    state["lora_unet_double_blocks_0_img_attn_bogus.lora_up.weight"] = torch.zeros(8, 2)
    save_file(state, tmp_path / "extra.safetensors")
    adapter = load_adapter(tmp_path / "extra.safetensors", "flux1")
    assert any("1 layers match no module" in n and "img_attn_bogus" in n for n in adapter.notes)
    bogus = {k: v for k, v in state.items() if "bogus" in k}
    save_file(bogus, tmp_path / "bogus.safetensors")
    with pytest.raises(KeyMismatchError, match="0 of 1 layers"):
        load_adapter(tmp_path / "bogus.safetensors", "flux1")
    save_file(kohya_flux_state_dict(SMALL_DEV, rank=2, text_encoders=()), tmp_path / "flux.safetensors")
    with pytest.raises(KeyMismatchError, match="FLUX.1"):
        load_adapter(tmp_path / "flux.safetensors", "sd15")
    lokr = {"lora_unet_double_blocks_0_img_attn_proj.lokr_w1": torch.ones(2, 2), "lora_unet_double_blocks_0_img_attn_proj.alpha": torch.tensor(1.0)}
    save_file(lokr, tmp_path / "lokr.safetensors")
    with pytest.raises(UnsupportedVariantError, match="lokr_w1"):
        load_adapter(tmp_path / "lokr.safetensors", "flux1")


def test_t5_layers_are_placed_and_round_trip(tmp_path, tiny_flux_dir):
    state = kohya_flux_state_dict(TINY_FLUX, rank=2, text_encoders=("clip", "t5"), in_layers=True, dtype=torch.float32)
    save_file(state, tmp_path / "t5.safetensors")
    adapter = load_adapter(tmp_path / "t5.safetensors", str(tiny_flux_dir))
    t5 = [m for m in adapter.lora_layers if m.startswith("text_encoder_2.")]
    assert len(t5) == 2 * 7 and "text_encoder_2.encoder.block.0.layer.1.DenseReluDense.wi_0" in t5
    save_adapter(adapter, tmp_path / "back.safetensors", "kohya")
    back = load_file(tmp_path / "back.safetensors")
    assert set(back) == set(state) and all(torch.equal(back[k], state[k].float()) for k in state)


def test_load_lora_weights_of_studio_export_applies_every_layer(tmp_path, tiny_flux_dir):
    """diffusers' FluxPipeline.load_lora_weights on the studio's diffusers export: every layer, the right delta."""
    from diffusers import FluxPipeline

    path = write_kohya_flux(tmp_path / "tiny.safetensors", p=TINY_FLUX, rank=2, alpha=3.0, in_layers=True, dtype=torch.float32)
    adapter = load_adapter(path, str(tiny_flux_dir))
    assert not any("skipped" in note for note in adapter.notes)
    exported = save_adapter(adapter, tmp_path / "export.safetensors", "diffusers")
    pipe = FluxPipeline.from_pretrained(tiny_flux_dir, local_files_only=True)
    before = {m: _weight(pipe, m).clone() for m in adapter.lora_layers}
    pipe.load_lora_weights(str(exported), adapter_name="studio")
    wrapped = {f"{c}.{n}" for c in ("transformer", "text_encoder") for n, mod in getattr(pipe, c).named_modules() if hasattr(mod, "lora_A") and "studio" in mod.lora_A}
    assert wrapped == set(adapter.lora_layers)
    pipe.fuse_lora(components=["transformer", "text_encoder"], adapter_names=["studio"])
    errors = {m: float((_weight(pipe, m) - before[m] - adapter.delta(m)).norm() / adapter.delta(m).norm()) for m in adapter.lora_layers}
    assert max(errors.values()) < 1e-5, max(errors.items(), key=lambda kv: kv[1])


def _weight(pipe, module: str) -> torch.Tensor:
    component, _, path = module.partition(".")
    layer = getattr(pipe, component).get_submodule(path)
    return (layer.base_layer if hasattr(layer, "base_layer") else layer).weight.detach()


def test_metadata_alpha_is_what_diffusers_reads(tmp_path, tiny_flux_dir):
    adapter = load_adapter(write_kohya_flux(tmp_path / "a.safetensors", p=TINY_FLUX, rank=4, alpha=2.0, dtype=torch.float32), str(tiny_flux_dir))
    save_adapter(adapter, tmp_path / "d.safetensors", "diffusers")
    from studio.formats.safe import read_header

    _, metadata = read_header(tmp_path / "d.safetensors")
    config = json.loads(metadata["lora_adapter_metadata"])  # the scale alpha / r = 0.5 is baked into lora_B
    assert config["transformer.r"] == 4 and config["transformer.lora_alpha"] == 4.0
    again = load_adapter(tmp_path / "d.safetensors", str(tiny_flux_dir))
    assert all(torch.allclose(again.delta(m), adapter.delta(m), atol=1e-6) for m in adapter.lora_layers)
