"""Each reader checked against the producing tool's own math (issue 13 items 4, 11, 12, 13).

The references here are written from reading the producers' code, independently of the studio's
implementation: LyCORIS ``functional/lokr.py`` (``make_kron``, ``diff_weight``) and
``functional/loha.py``; kohya's LoRAModule (alpha 0 or missing -> alpha = rank); peft's own
``save_pretrained`` and ``get_delta_weight`` (run here); kohya sd-scripts' SDXL key names.
"""

from __future__ import annotations

import json
import math
import resource

import pytest
import torch
from safetensors.torch import load_file, save_file

from studio.bases import architecture_tree, module_tree
from studio.errors import FormatError, KeyMismatchError
from studio.formats import load_adapter, save_adapter
from studio.formats.keys import kohya_name
from studio.formats.sgm import sgm_path

Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"  # SD1.5: (320, 320)
CONV = "lora_unet_down_blocks_0_resnets_0_conv1"  # SD1.5: (320, 320, 3, 3)
Q_MODULE = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
CONV_MODULE = "unet.down_blocks.0.resnets.0.conv1"


def lycoris_lokr_reference(w1, w1a, w1b, w2, w2a, w2b, alpha):
    """LyCORIS ``diff_weight``: rank from w1a, else w2a, else none (scale 1); ``make_kron`` unsqueezes w1."""
    rank = w1a.shape[1] if w1a is not None else w2a.shape[1] if w2a is not None else None
    scale = 1.0 if rank is None else (rank if alpha in (None, 0) else alpha) / rank
    w1 = w1 if w1 is not None else w1a @ w1b
    if w2 is None:
        r, o, *k = w2b.shape
        w2 = (w2a @ w2b.reshape(r, -1)).reshape(-1, o, *k)
    for _ in range(w2.dim() - w1.dim()):
        w1 = w1.unsqueeze(-1)
    return torch.kron(w1, w2) * scale


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _write(tmp_path, name, tensors, metadata=None):
    path = tmp_path / name
    save_file(tensors, path, metadata=metadata)
    return path


def _relative(observed, expected):
    return float((observed - expected).norm() / expected.norm())


@pytest.mark.parametrize("alpha", [2.0, 0.0, None])
def test_lokr_low_rank_w1_full_conv_w2_scale_as_lycoris(tmp_path, alpha):
    g = _gen(1)
    w1a, w1b = torch.randn(4, 2, generator=g), torch.randn(2, 8, generator=g)  # w1 (4, 8) low rank 2
    w2 = torch.randn(80, 40, 3, 3, generator=g)  # full 4-D: (4*80, 8*40, 3, 3) = SD1.5 conv1
    tensors = {f"{CONV}.lokr_w1_a": w1a, f"{CONV}.lokr_w1_b": w1b, f"{CONV}.lokr_w2": w2}
    if alpha is not None:
        tensors[f"{CONV}.alpha"] = torch.tensor(alpha)
    adapter = load_adapter(_write(tmp_path, "lokr.safetensors", tensors), "sd15")
    expected = lycoris_lokr_reference(None, w1a, w1b, w2, None, None, alpha).flatten(1)
    layer = adapter.lora_layers[CONV_MODULE]
    assert _relative(adapter.delta(CONV_MODULE), expected) < 0.01
    assert layer.down.shape[1:] == (320, 3, 3) and layer.up.shape[2:] == (1, 1)  # 4-D, as kohya / diffusers expect


def test_lokr_both_full_has_scale_one(tmp_path):
    g = _gen(2)
    w1 = torch.randn(4, 4, generator=g)
    w2 = torch.randn(80, 2, generator=g) @ torch.randn(2, 80, generator=g)  # stored full; kron has rank 8
    tensors = {f"{Q}.lokr_w1": w1, f"{Q}.lokr_w2": w2, f"{Q}.alpha": torch.tensor(7.0)}
    adapter = load_adapter(_write(tmp_path, "full.safetensors", tensors), "sd15")
    expected = lycoris_lokr_reference(w1, None, None, w2, None, None, 7.0)
    assert _relative(adapter.delta(Q_MODULE), expected) < 1e-5


def test_lokr_both_low_rank_takes_w1_rank(tmp_path):
    g = _gen(3)
    parts = {"lokr_w1_a": torch.randn(4, 3, generator=g), "lokr_w1_b": torch.randn(3, 4, generator=g),
             "lokr_w2_a": torch.randn(80, 5, generator=g), "lokr_w2_b": torch.randn(5, 80, generator=g)}
    tensors = {f"{Q}.{k}": v for k, v in parts.items()} | {f"{Q}.alpha": torch.tensor(6.0)}
    adapter = load_adapter(_write(tmp_path, "both.safetensors", tensors), "sd15")
    expected = lycoris_lokr_reference(None, parts["lokr_w1_a"], parts["lokr_w1_b"], None, parts["lokr_w2_a"], parts["lokr_w2_b"], 6.0)
    assert _relative(adapter.delta(Q_MODULE), expected) < 1e-5  # scale 6 / 3 (w1's rank), not 6 / 5
    assert adapter.lora_layers[Q_MODULE].rank == 15  # exact rank 3 * 5 reached by the 1% target


def test_loha_conv_matches_lycoris_and_writes_4d(tmp_path):
    g = _gen(4)
    parts = {"hada_w1_a": torch.randn(320, 2, generator=g), "hada_w1_b": torch.randn(2, 320, 3, 3, generator=g),
             "hada_w2_a": torch.randn(320, 2, generator=g), "hada_w2_b": torch.randn(2, 320, 3, 3, generator=g)}
    tensors = {f"{CONV}.{k}": v for k, v in parts.items()} | {f"{CONV}.alpha": torch.tensor(1.0)}
    adapter = load_adapter(_write(tmp_path, "loha.safetensors", tensors), "sd15")
    w1 = parts["hada_w1_a"] @ parts["hada_w1_b"].flatten(1)
    w2 = parts["hada_w2_a"] @ parts["hada_w2_b"].flatten(1)
    assert _relative(adapter.delta(CONV_MODULE), w1 * w2 * (1.0 / 2)) < 1e-5
    written = load_file(save_adapter(adapter, tmp_path / "out.safetensors", "kohya"))
    assert written[f"{CONV}.lora_down.weight"].shape == (4, 320, 3, 3)
    assert written[f"{CONV}.lora_up.weight"].shape == (320, 4, 1, 1)


def test_lycoris_conversion_states_its_error_and_warns_above_one_percent(tmp_path):
    g = _gen(5)
    parts = {"hada_w1_a": torch.randn(320, 16, generator=g), "hada_w1_b": torch.randn(16, 320, generator=g),
             "hada_w2_a": torch.randn(320, 16, generator=g), "hada_w2_b": torch.randn(16, 320, generator=g)}
    path = _write(tmp_path, "loha16.safetensors", {f"{Q}.{k}": v for k, v in parts.items()})
    fixed = load_adapter(path, "sd15", lycoris_rank=8)
    warning = next(n for n in fixed.notes if "LyCORIS" in n)
    assert warning.startswith("warning:") and "truncated to rank 8" in warning
    auto = load_adapter(path, "sd15")
    note = next(n for n in auto.notes if "LyCORIS" in n)
    worst = float(note.split("max ")[1].split(";")[0])
    assert "1% error" in note and (worst <= 0.01 or note.startswith("warning:"))


@pytest.mark.parametrize("rank", [0, -3, 2.5, True])
def test_lycoris_rank_must_be_positive(tmp_path, rank):
    from studio.errors import StudioError

    path = _write(tmp_path, "a.safetensors", {f"{Q}.lora_down.weight": torch.randn(2, 320), f"{Q}.lora_up.weight": torch.randn(320, 2)})
    with pytest.raises(StudioError, match="lycoris_rank must be a positive integer"):
        load_adapter(path, "sd15", lycoris_rank=rank)


def test_small_loha_cannot_amplify_memory(tmp_path):
    """2 MB of fp16 factors with rank 800 on a 320x320 layer: the old face-splitting product was 320 x 640000."""
    g = _gen(6)
    parts = {n: torch.randn(*s, generator=g).half() * 0.01 for n, s in
             {"hada_w1_a": (320, 800), "hada_w1_b": (800, 320), "hada_w2_a": (320, 800), "hada_w2_b": (800, 320)}.items()}
    path = _write(tmp_path, "amp.safetensors", {f"{Q}.{k}": v for k, v in parts.items()})
    assert path.stat().st_size < 2.2e6
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    adapter = load_adapter(path, "sd15", lycoris_rank=16)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert adapter.lora_layers[Q_MODULE].rank == 16 and grown_mb < 300


def test_small_lokr_promising_a_huge_dw_is_refused_unallocated(tmp_path):
    g = _gen(7)
    tensors = {f"{Q}.lokr_w1": torch.randn(256, 256, generator=g), f"{Q}.lokr_w2_a": torch.randn(256, 1, generator=g),
               f"{Q}.lokr_w2_b": torch.randn(1, 256, generator=g)}  # kron: 65536 x 65536 = 16 GiB in fp32
    with pytest.raises(FormatError, match="over the cap"):
        load_adapter(_write(tmp_path, "huge.safetensors", tensors), "sd15")
    tensors = {f"{Q}.lokr_w1": torch.randn(8, 8, generator=g), f"{Q}.lokr_w2_a": torch.randn(320, 1, generator=g),
               f"{Q}.lokr_w2_b": torch.randn(1, 320, generator=g)}  # 2560 x 2560: under the cap, fits no module
    with pytest.raises(KeyMismatchError, match="wrong shape"):
        load_adapter(_write(tmp_path, "wrong.safetensors", tensors), "sd15")


def test_corrupt_diffusers_metadata_is_an_error_naming_the_file(tmp_path):
    tensors = {"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.randn(2, 320),
               "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": torch.randn(320, 2)}
    for bad, problem in [("{not json", "not valid JSON"), ("[1, 2]", "not a JSON object"),
                         (json.dumps({"unet.lora_alpha": "big"}), "lora_alpha must be a finite number"),
                         (json.dumps({"unet.lora_alpha": 2, "unet.use_rslora": "yes"}), "use_rslora must be true or false"),
                         (json.dumps({"unet.r": 2, "unet.lora_alpha": 2, "unet.alpha_pattern": [1]}), "alpha_pattern must be an object")]:
        path = _write(tmp_path, "meta.safetensors", tensors, {"lora_adapter_metadata": bad})
        with pytest.raises(FormatError, match=rf"meta\.safetensors.*{problem}"):
            load_adapter(path, "sd15")


def test_diffusers_file_without_alpha_says_so(tmp_path):
    tensors = {"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.randn(2, 320),
               "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": torch.randn(320, 2)}
    adapter = load_adapter(_write(tmp_path, "plain.safetensors", tensors), "sd15")
    assert adapter.lora_layers[Q_MODULE].scale == 1.0
    assert any("alpha = rank" in note and "diffusers" in note for note in adapter.notes)


def test_diffusers_metadata_rslora_and_alpha_pattern(tmp_path):
    other = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k"
    tensors = {f"unet.{m}.lora_{ab}.weight": torch.randn(*(4, 320) if ab == "A" else (320, 4))
               for m in ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", other) for ab in "AB"}
    meta = {"unet.r": 4, "unet.lora_alpha": 2, "unet.use_rslora": True, "unet.alpha_pattern": {other: 6}}
    adapter = load_adapter(_write(tmp_path, "rs.safetensors", tensors, {"lora_adapter_metadata": json.dumps(meta)}), "sd15")
    assert math.isclose(adapter.lora_layers[Q_MODULE].scale, 2 / math.sqrt(4))
    assert math.isclose(adapter.lora_layers[f"unet.{other}"].scale, 6 / math.sqrt(4))


PEFT_CASES = {
    "alpha": dict(r=4, lora_alpha=3),
    "rslora": dict(r=4, lora_alpha=3, use_rslora=True),
    "patterns": dict(r=4, lora_alpha=3, rank_pattern={"attn2.to_k": 2}, alpha_pattern={"to_v": 7, "attn2.to_q": 1.5}),
}


@pytest.mark.parametrize("case", sorted(PEFT_CASES))
def test_peft_saved_adapter_matches_peft_delta(tmp_path, tiny_pipeline_dir, case):
    """peft's own save_pretrained (adapter_model.safetensors + adapter_config.json) on a tiny UNet."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(tiny_pipeline_dir / "unet")
    config = LoraConfig(target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False, **PEFT_CASES[case])
    model = get_peft_model(unet, config)
    model.save_pretrained(tmp_path / "peft")
    expected = {f"unet.{name.removeprefix('base_model.model.')}": module.get_delta_weight("default").detach().flatten(1)
                for name, module in model.named_modules() if hasattr(module, "get_delta_weight") and "default" in getattr(module, "lora_A", {})}
    assert (tmp_path / "peft" / "adapter_config.json").is_file() and len(expected) > 8
    adapter = load_adapter(tmp_path / "peft" / "adapter_model.safetensors", str(tiny_pipeline_dir))
    assert adapter.source_format == "peft" and set(adapter.layers()) == set(expected)
    worst = max(_relative(adapter.delta(m), d) for m, d in expected.items())
    assert worst < 1e-6, worst
    assert any("adapter_config.json" in note for note in adapter.notes)


def _kohya_sdxl_locon_names(tree) -> list[tuple[str, str]]:
    """(kohya stem, module) of every module kohya's LoRA network targets on SDXL with conv_dim set.

    kohya sd-scripts ``networks/lora.py``: UNet classes Transformer2DModel, ResnetBlock2D,
    Downsample2D, Upsample2D (every Linear / Conv2d inside), text encoders' CLIPAttention and
    CLIPMLP; names are ``lora_unet_`` + the module path in kohya's own SDXL UNet
    (``sdxl_original_unet.py``: input_blocks / middle_block / output_blocks, resnets with
    in_layers.2 / emb_layers.1 / out_layers.3 / skip_connection, downsample ``op``), and
    ``lora_te1_`` / ``lora_te2_`` + the CLIP path.
    """
    names = []
    for module in tree.modules:
        component, _, path = module.partition(".")
        if component == "unet":
            if not any(f".{kind}." in path for kind in ("attentions", "resnets", "downsamplers", "upsamplers")):
                continue  # conv_in, conv_out, time_embedding, add_embedding are not targeted
            names.append((f"lora_unet_{sgm_path(path, tree.unet_config).replace('.', '_')}", module))
        elif ".self_attn." in path or ".mlp." in path:
            prefix = "lora_te1" if component == "text_encoder" else "lora_te2"
            clip = path if path.startswith("text_model.") else f"text_model.{path}"
            names.append((f"{prefix}_{clip.replace('.', '_')}", module))
    return names


def test_kohya_sdxl_locon_file_places_all_1052_layers(tmp_path):
    tree = architecture_tree("sdxl")
    names = _kohya_sdxl_locon_names(tree)
    assert len(names) == 1052
    assert ("lora_unet_input_blocks_1_0_in_layers_2", "unet.down_blocks.0.resnets.0.conv1") in names
    assert ("lora_unet_output_blocks_2_2_conv", "unet.up_blocks.0.upsamplers.0.conv") in names
    tensors = {}
    for stem, module in names:
        out, *rest = tree.modules[module].weight_shape
        tensors[f"{stem}.lora_down.weight"] = torch.zeros(1, *rest, dtype=torch.float16)
        tensors[f"{stem}.lora_up.weight"] = torch.zeros(out, 1, *([1, 1] if rest[1:] else []), dtype=torch.float16)
        tensors[f"{stem}.alpha"] = torch.tensor(1.0, dtype=torch.float16)
    adapter = load_adapter(_write(tmp_path, "sdxl_locon.safetensors", tensors))
    assert adapter.base_arch == "sdxl" and len(adapter.layers()) == 1052 and not adapter.notes
    assert {m for _, m in names} == set(adapter.layers())
    written = load_file(save_adapter(adapter, tmp_path / "again.safetensors", "kohya"))
    assert {k.partition(".")[0] for k in written} == {s for s, _ in names}  # kohya's own SGM names back


def test_sgm_table_agrees_with_diffusers_conversion():
    """diffusers' own kohya-SDXL conversion maps every SGM name the studio writes back to its module."""
    from types import SimpleNamespace

    from diffusers.loaders.lora_conversion_utils import _convert_unet_lora_key, _maybe_map_sgm_blocks_to_diffusers

    tree = architecture_tree("sdxl")
    keys = {f"lora_unet_{sgm_path(m[5:], tree.unet_config).replace('.', '_')}.lora_down.weight": m[5:]
            for m in tree.modules if m.startswith("unet.")}
    mapped = _maybe_map_sgm_blocks_to_diffusers(dict(keys), SimpleNamespace(layers_per_block=2))
    assert len(mapped) == len(keys) == 794
    for key, module in mapped.items():
        name = _convert_unet_lora_key(key).replace(".processor", "").removesuffix(".down.weight")
        name = name.replace("to_out_lora", "to_out.0").removesuffix("_lora").removesuffix(".lora")
        assert name == module, key
