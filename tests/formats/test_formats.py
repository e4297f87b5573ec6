"""Formats: every key scheme in, kohya and diffusers out, exact round trips, real files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from studio.adapters.lora import LoraAdapter, LoraLayer
from studio.bases import architecture_tree, module_tree
from studio.formats import load_adapter, save_adapter
from studio.formats.keys import file_module_name, kohya_name, resolve_stems

ATTENTION = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0")


def random_adapter(tree, rank=4, predicate=lambda m: True, seed=0, alpha=None, name="test") -> LoraAdapter:
    """A LoRA on every module of ``tree`` that ``predicate`` accepts, native conv shapes included."""
    generator = torch.Generator().manual_seed(seed)
    layers = {}
    for module, info in tree.modules.items():
        if not predicate(module):
            continue
        out, *rest = info.weight_shape
        if info.kind == "conv":
            down = torch.randn(rank, rest[0], *rest[1:], generator=generator)
            up = torch.randn(out, rank, 1, 1, generator=generator)
        else:
            down = torch.randn(rank, rest[0], generator=generator)
            up = torch.randn(out, rank, generator=generator)
        layers[module] = LoraLayer(down, up, float(alpha if alpha is not None else rank / 2))
    return LoraAdapter(name, layers, {"ss_network_dim": str(rank), "ss_tag_frequency": json.dumps({"d": {"mytrigger": 5, "x": 1}})})


def assert_same_layers(a: LoraAdapter, b: LoraAdapter) -> None:
    assert set(a.lora_layers) == set(b.lora_layers)
    for module, layer in a.lora_layers.items():
        other = b.lora_layers[module]
        assert torch.equal(layer.down, other.down) and layer.down.dtype == other.down.dtype, module
        assert torch.equal(layer.up, other.up), module
        assert layer.alpha == other.alpha, module


def assert_same_deltas(a: LoraAdapter, b: LoraAdapter, rtol: float = 1e-6) -> None:
    """Same layers and the same dW per layer (a diffusers export bakes alpha / rank into lora_B)."""
    assert set(a.lora_layers) == set(b.lora_layers)
    for module in a.lora_layers:
        expected, observed = a.delta(module), b.delta(module)
        assert float((observed - expected).norm()) <= rtol * max(float(expected.norm()), 1e-30), module


@pytest.fixture(scope="module")
def tiny_tree(tiny_pipeline_dir):
    return module_tree(str(tiny_pipeline_dir))


def test_kohya_round_trip_is_exact(tmp_path, tiny_tree, tiny_pipeline_dir):
    adapter = random_adapter(tiny_tree)
    save_adapter(adapter, tmp_path / "a.safetensors", "kohya")
    loaded = load_adapter(tmp_path / "a.safetensors", str(tiny_pipeline_dir))
    assert loaded.source_format == "kohya"
    assert_same_layers(adapter, loaded)
    assert loaded.metadata == adapter.metadata
    save_adapter(loaded, tmp_path / "b.safetensors", "kohya")
    first, second = load_file(tmp_path / "a.safetensors"), load_file(tmp_path / "b.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_kohya_diffusers_kohya_round_trip_keeps_every_delta(tmp_path, tiny_tree, tiny_pipeline_dir):
    adapter = random_adapter(tiny_tree, alpha=None)
    adapter.lora_layers[next(iter(adapter.lora_layers))].alpha = 1.0  # mixed alphas
    save_adapter(adapter, tmp_path / "k.safetensors", "kohya")
    via_kohya = load_adapter(tmp_path / "k.safetensors", str(tiny_pipeline_dir))
    save_adapter(via_kohya, tmp_path / "d.safetensors", "diffusers")
    raw = load_file(tmp_path / "d.safetensors")
    assert not any(key.endswith(".alpha") for key in raw)  # the scale is baked into lora_B: alpha = rank
    via_diffusers = load_adapter(tmp_path / "d.safetensors", str(tiny_pipeline_dir))
    assert via_diffusers.source_format == "diffusers"
    assert all(layer.alpha == layer.rank for layer in via_diffusers.lora_layers.values())
    assert_same_deltas(adapter, via_diffusers)
    assert via_diffusers.metadata == adapter.metadata
    save_adapter(via_diffusers, tmp_path / "k2.safetensors", "kohya")
    again = load_adapter(tmp_path / "k2.safetensors", str(tiny_pipeline_dir))
    assert_same_deltas(adapter, again)


def _text_encoder_and_unet_deltas(pipe) -> dict[str, torch.Tensor]:
    weights = {}
    for component in ("unet", "text_encoder"):
        for name, param in getattr(pipe, component).named_parameters():
            if name.endswith("weight") and "lora" not in name:
                weights[f"{component}.{name}"] = param.detach().clone()
    return weights


@pytest.mark.parametrize("layout", ["kohya", "diffusers"])
def test_delta_matches_diffusers_load_lora_weights(tmp_path, tiny_tree, tiny_pipeline_dir, layout):
    """dW from our file equals what diffusers' own loader applies (fused) to the same pipeline."""
    from diffusers import StableDiffusionPipeline

    adapter = random_adapter(tiny_tree, predicate=lambda m: m.endswith(ATTENTION) or "self_attn" in m, seed=3)
    for layer in adapter.lora_layers.values():
        layer.up.mul_(0.01)
    path = save_adapter(adapter, tmp_path / f"{layout}.safetensors", layout)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir, local_files_only=True)
    before = _text_encoder_and_unet_deltas(pipe)
    pipe.load_lora_weights(str(path), adapter_name="x")
    pipe.fuse_lora(components=["unet", "text_encoder"], lora_scale=1.0)
    after = _text_encoder_and_unet_deltas(pipe)
    loaded = load_adapter(path, str(tiny_pipeline_dir))
    checked = 0
    for module in loaded.layers():
        key = f"{module}.weight"
        if key not in after:
            key = f"{module}.base_layer.weight"
        observed = (after[key] - before[f"{module}.weight"]).flatten(1)
        expected = loaded.delta(module)
        assert torch.allclose(observed, expected, atol=1e-6, rtol=1e-4), module
        checked += 1
    assert checked == len(adapter.lora_layers) and any(m.startswith("text_encoder") for m in loaded.layers())


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_real_key_sets_map_completely(tmp_path, arch):
    tree = architecture_tree(arch)
    adapter = random_adapter(tree, rank=1)
    adapter.base_arch = arch
    save_adapter(adapter, tmp_path / "all.safetensors", "kohya")
    loaded = load_adapter(tmp_path / "all.safetensors", arch)
    assert set(loaded.layers()) == set(tree.modules)
    assert len(tree.modules) > 300 and not loaded.notes
    guessed = load_adapter(tmp_path / "all.safetensors")
    assert guessed.base_arch == arch


def test_file_names_keep_text_model_level():
    module = "text_encoder.encoder.layers.0.self_attn.q_proj"
    assert file_module_name(module) == "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"
    assert kohya_name(file_module_name(module), False) == "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    assert kohya_name(file_module_name(module), True) == "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"


def test_sdxl_sgm_block_names_resolve():
    tree = architecture_tree("sdxl")
    stems = [
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
        "lora_unet_middle_block_1_transformer_blocks_3_attn2_to_k",
        "lora_unet_output_blocks_0_1_transformer_blocks_9_ff_net_2",
        "lora_te2_text_model_encoder_layers_31_mlp_fc1",
    ]
    resolved = resolve_stems("kohya", stems, tree)
    assert resolved == {
        stems[0]: "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
        stems[1]: "unet.mid_block.attentions.0.transformer_blocks.3.attn2.to_k",
        stems[2]: "unet.up_blocks.0.attentions.0.transformer_blocks.9.ff.net.2",
        stems[3]: next(m for m in tree.modules if m.startswith("text_encoder_2.") and m.endswith("layers.31.mlp.fc1")),
    }


def test_peft_keys_are_read(tmp_path, tiny_tree, tiny_pipeline_dir):
    adapter = random_adapter(tiny_tree, predicate=lambda m: m.startswith("unet.") and m.endswith(ATTENTION), alpha=4)
    tensors = {}
    for module, layer in adapter.lora_layers.items():
        path = module.removeprefix("unet.")
        tensors[f"base_model.model.{path}.lora_A.weight"] = layer.down
        tensors[f"base_model.model.{path}.lora_B.weight"] = layer.up
    save_file(tensors, tmp_path / "peft.safetensors")
    loaded = load_adapter(tmp_path / "peft.safetensors", str(tiny_pipeline_dir))
    assert loaded.source_format == "peft" and set(loaded.layers()) == set(adapter.layers())
    assert loaded.alphas == [4.0]  # peft convention without a config: alpha = rank


def test_conv_locon_round_trip(tmp_path, tiny_tree, tiny_pipeline_dir):
    adapter = random_adapter(tiny_tree, predicate=lambda m: tiny_tree.modules[m].kind == "conv")
    assert any(layer.down.dim() == 4 and layer.down.shape[-1] == 3 for layer in adapter.lora_layers.values())
    save_adapter(adapter, tmp_path / "locon.safetensors", "kohya")
    loaded = load_adapter(tmp_path / "locon.safetensors", str(tiny_pipeline_dir))
    assert_same_layers(adapter, loaded)
    module = next(m for m, l in adapter.lora_layers.items() if l.down.shape[-1] == 3)
    shape = tiny_tree.modules[module].weight_shape
    assert loaded.delta(module).reshape(shape).shape == torch.Size(shape)


def _lycoris_file(path: Path, kind: str, tree, rank: int = 2) -> dict[str, torch.Tensor]:
    """LoHa / LoKr tensors for the attention layers of ``tree``, and their dense dW per kohya stem."""
    generator = torch.Generator().manual_seed(7)
    tensors, dense = {}, {}
    for module, info in tree.modules.items():
        if not module.startswith("unet.") or not module.endswith(("to_q", "to_k")):
            continue
        out, inp = info.weight_shape[0], int(math.prod(info.weight_shape[1:]))
        stem = kohya_name(module, False)
        tensors[f"{stem}.alpha"] = torch.tensor(float(rank))
        if kind == "loha":
            parts = {n: torch.randn(*s, generator=generator) for n, s in
                     {"hada_w1_a": (out, rank), "hada_w1_b": (rank, inp), "hada_w2_a": (out, rank), "hada_w2_b": (rank, inp)}.items()}
            dense[module] = (parts["hada_w1_a"] @ parts["hada_w1_b"]) * (parts["hada_w2_a"] @ parts["hada_w2_b"])
        else:
            parts = {n: torch.randn(*s, generator=generator) for n, s in
                     {"lokr_w1": (4, 4), "lokr_w2_a": (out // 4, rank), "lokr_w2_b": (rank, inp // 4)}.items()}
            dense[module] = torch.kron(parts["lokr_w1"], parts["lokr_w2_a"] @ parts["lokr_w2_b"])
        tensors.update({f"{stem}.{n}": t for n, t in parts.items()})
    save_file(tensors, path)
    return dense


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_lycoris_materialised_and_truncated(tmp_path, tiny_tree, tiny_pipeline_dir, kind):
    dense = _lycoris_file(tmp_path / f"{kind}.safetensors", kind, tiny_tree)
    exact = load_adapter(tmp_path / f"{kind}.safetensors", str(tiny_pipeline_dir), lycoris_rank=64)
    assert exact.source_format == f"lycoris-{kind}"
    for module, expected in dense.items():
        assert torch.allclose(exact.delta(module), expected, atol=1e-3, rtol=1e-4)
    truncated = load_adapter(tmp_path / f"{kind}.safetensors", str(tiny_pipeline_dir), lycoris_rank=1)
    note = next(n for n in truncated.notes if "truncated to rank 1" in n)
    mean_error = float(note.split("mean ")[1].split(",")[0])
    module = next(iter(dense))
    observed = float(torch.linalg.norm(truncated.delta(module) - dense[module]) / torch.linalg.norm(dense[module]))
    assert 0.05 < mean_error < 1 and 0.05 < observed < 1


def test_shared_loras_import_and_round_trip(tmp_path, shared_loras):
    expected_refusals = {"sd15_cloneofsimo_safeloras_analog_r4": "safeloras", "sd2_bf16_vfph55": "SD2.x"}
    for path in shared_loras:
        if path.stem in expected_refusals:
            continue
        adapter = load_adapter(path, "sd15")
        assert adapter.base_arch == "sd15" and len(adapter.layers()) >= 128
        attention = [m for m in adapter.layers() if m.startswith("unet.") and m.endswith(ATTENTION)]
        assert len(attention) == 128, path.name  # every attention projection of the SD1.5 UNet
        for layout in ("kohya", "diffusers"):
            again = load_adapter(save_adapter(adapter, tmp_path / f"{path.stem}.{layout}.safetensors", layout), "sd15")
            if adapter.source_format == "kohya" and len(adapter.alphas) == 1:
                assert_same_layers(adapter, again)  # one alpha: the kohya round trip is tensor for tensor
            assert_same_deltas(adapter, again)
            assert again.metadata == adapter.metadata


def test_shared_sd2_file_refused_for_sd15_and_accepted_for_sd2(shared_loras):
    from studio.errors import KeyMismatchError

    path = next(p for p in shared_loras if p.stem == "sd2_bf16_vfph55")
    with pytest.raises(KeyMismatchError, match=r"looks like it is for SD2\.x"):
        load_adapter(path, "sd15")
    assert load_adapter(path, "sd2").base_arch == "sd2"
    assert load_adapter(path).base_arch == "sd2"


def test_shared_lokr_file_keeps_kohya_metadata(shared_loras):
    path = next(p for p in shared_loras if "lokr" in p.stem)
    adapter = load_adapter(path, "sd15", lycoris_rank=16)
    assert adapter.source_format == "lycoris-lokr"
    assert adapter.metadata["ss_network_module"] == "lycoris.kohya"
    assert any(m.startswith("text_encoder.") for m in adapter.layers())
    assert not any("match no module" in note for note in adapter.notes)
