"""A corpus of named bad files for the reader (issue 13 item 6): each a StudioError naming the file
and the problem; the whole corpus in one folder still gives a folder report with the good file."""

from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from studio.collection import load_collection
from studio.errors import FormatError, KeyMismatchError, StudioError, UnsafeFileError, UnsupportedVariantError
from studio.formats import load_adapter

Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"  # SD1.5 (320, 320)
GOOD = {f"{Q}.lora_down.weight": torch.ones(2, 320) * 0.01, f"{Q}.lora_up.weight": torch.ones(320, 2) * 0.01, f"{Q}.alpha": torch.tensor(2.0)}


def raw(header, data: bytes = b"") -> bytes:
    """A safetensors file with a hand-written header (dict, or str / bytes taken as the JSON text)."""
    body = header if isinstance(header, bytes) else (header if isinstance(header, str) else json.dumps(header)).encode()
    return struct.pack("<Q", len(body)) + body + data


def one(dtype="F32", shape=(2,), offsets=(0, 8), data=b"\0" * 8, **extra) -> bytes:
    entry = {"dtype": dtype, "shape": list(shape) if isinstance(shape, tuple) else shape, "data_offsets": list(offsets) if isinstance(offsets, tuple) else offsets}
    return raw({"t": entry, **extra}, data)


def layer(**parts) -> dict:
    return {f"{Q}.{k}": v for k, v in parts.items()}


def loha(**override) -> dict:
    parts = {"hada_w1_a": torch.randn(320, 2), "hada_w1_b": torch.randn(2, 320), "hada_w2_a": torch.randn(320, 2), "hada_w2_b": torch.randn(2, 320)}
    parts.update(override)
    return layer(**{k: v for k, v in parts.items() if v is not None})


def lokr(**override) -> dict:
    parts = {"lokr_w1": torch.randn(4, 4), "lokr_w2_a": torch.randn(80, 2), "lokr_w2_b": torch.randn(2, 80)}
    parts.update(override)
    return layer(**{k: v for k, v in parts.items() if v is not None})


# name -> (bytes or tensors [, metadata], error class, problem regex)
CASES: dict[str, tuple] = {
    "empty": (b"", FormatError, "truncated"),
    "seven_bytes": (b"\x01" * 7, FormatError, "truncated"),
    "huge_header_length": (struct.pack("<Q", 2**40) + b"{}", FormatError, "exceeds the cap"),
    "header_longer_than_file": (struct.pack("<Q", 500) + b"{}", FormatError, "larger than the file"),
    "header_not_json": (raw("{nope"), FormatError, "invalid header JSON"),
    "header_array": (raw("[1, 2]"), FormatError, "not a JSON object"),
    "header_deep_nesting": (raw('{"a": ' + "[" * 200_000 + "]" * 200_000 + "}"), FormatError, "nested too deeply"),
    "header_bad_utf8": (raw(b'{"\xff\xfe": 1}'), FormatError, "invalid header JSON"),
    "nan_offsets": (raw('{"t": {"dtype": "F32", "shape": [2], "data_offsets": [NaN, 8]}}', b"\0" * 8), FormatError, "invalid header JSON"),
    "infinity_shape": (raw('{"t": {"dtype": "F32", "shape": [Infinity], "data_offsets": [0, 8]}}', b"\0" * 8), FormatError, "invalid header JSON"),
    "bool_shape": (one(shape=[True, 2]), FormatError, "invalid shape"),
    "float_shape": (one(shape=[2.0]), FormatError, "invalid shape"),
    "negative_shape": (one(shape=[-2]), FormatError, "invalid shape"),
    "string_shape": (one(shape="2"), FormatError, "invalid shape"),
    "nine_dims": (one(shape=[1] * 9, offsets=(0, 4), data=b"\0" * 4), FormatError, "invalid shape"),
    "overflowing_shape": (one(shape=[2**40, 2**40]), FormatError, "over the cap"),
    "unknown_dtype": (one(dtype="F33"), FormatError, "unknown dtype"),
    "list_dtype": (one(dtype=["F32"]), FormatError, "unknown dtype"),
    "offsets_one_number": (one(offsets=[0]), FormatError, "byte range"),
    "offsets_floats": (one(offsets=[0.0, 8.0]), FormatError, "byte range"),
    "offsets_bool": (one(offsets=[False, 8]), FormatError, "byte range"),
    "offsets_past_end": (one(offsets=(0, 800)), FormatError, "byte range"),
    "offsets_wrong_size": (one(offsets=(0, 4)), FormatError, "byte range"),
    "entry_without_offsets": (raw({"t": {"dtype": "F32", "shape": [2]}}, b"\0" * 8), FormatError, "malformed header entry"),
    "entry_is_string": (raw({"t": "F32"}), FormatError, "malformed header entry"),
    "metadata_is_list": (raw({"__metadata__": [1]}), FormatError, "__metadata__ is not an object"),
    "no_tensors": (raw({"__metadata__": {"a": "b"}}), FormatError, "holds no tensors"),
    "pickle_renamed": (pickle.dumps({"a": 1}), UnsafeFileError, "pickle"),
    "rank_zero": (layer(**{"lora_down.weight": torch.zeros(0, 320), "lora_up.weight": torch.zeros(320, 0)}), FormatError, "rank 0"),
    "one_d_down": (layer(**{"lora_down.weight": torch.ones(320), "lora_up.weight": torch.ones(320, 1)}), FormatError, "do not fit"),
    "three_d_down": (layer(**{"lora_down.weight": torch.ones(2, 320, 1), "lora_up.weight": torch.ones(320, 2)}), FormatError, "do not fit"),
    "rank_mismatch": (layer(**{"lora_down.weight": torch.ones(2, 320), "lora_up.weight": torch.ones(320, 3)}), FormatError, "do not fit"),
    "missing_up": (layer(**{"lora_down.weight": torch.ones(2, 320)}), FormatError, "has no up weight"),
    "integer_factors": (layer(**{"lora_down.weight": torch.ones(2, 320, dtype=torch.int32), "lora_up.weight": torch.ones(320, 2, dtype=torch.int32)}), FormatError, "floating-point"),
    "alpha_vector": ({**GOOD, f"{Q}.alpha": torch.ones(3)}, FormatError, "expected a scalar"),
    "conv_up_3x3": (layer(**{"lora_down.weight": torch.ones(2, 320, 3, 3), "lora_up.weight": torch.ones(320, 2, 3, 3)}), FormatError, "must be 1x1"),
    "nan_weight": ({**GOOD, f"{Q}.lora_up.weight": torch.full((320, 2), float("nan"))}, FormatError, "NaN or inf"),
    "fp16_overflow": ({k: v.half() for k, v in GOOD.items()} | {f"{Q}.lora_up.weight": torch.full((320, 2), 7e4).half()}, FormatError, "NaN or inf"),
    "loha_1d_factor": (loha(hada_w1_a=torch.randn(320)), FormatError, "hada_w1_a has shape .* expected 2-D"),
    "loha_scalar_factor": (loha(hada_w2_b=torch.tensor(1.0)), FormatError, "hada_w2_b has shape"),
    "loha_missing_factor": (loha(hada_w2_b=None), FormatError, "lacks tensor 'hada_w2_b'"),
    "loha_halves_differ": (loha(hada_w2_b=torch.randn(2, 160)), FormatError, "halves have different shapes"),
    "loha_inner_rank_mismatch": (loha(hada_w1_b=torch.randn(3, 320)), FormatError, "ranks do not fit"),
    "loha_tucker": (loha(hada_t1=torch.randn(2, 2, 3, 3), hada_t2=torch.randn(2, 2, 3, 3)), UnsupportedVariantError, "Tucker cores"),
    "lokr_1d_w1": (lokr(lokr_w1=torch.randn(4)), FormatError, "lokr_w1 has shape"),
    "lokr_scalar_w2_a": (lokr(lokr_w2_a=torch.tensor(2.0)), FormatError, "lokr_w2_a has shape"),
    "lokr_factors_do_not_fit": (lokr(lokr_w2_b=torch.randn(3, 80)), FormatError, "factors do not fit"),
    "lokr_huge_dense": (lokr(lokr_w1=torch.randn(256, 256), lokr_w2_a=torch.randn(256, 1), lokr_w2_b=torch.randn(1, 256)), FormatError, "over the cap"),
    "lokr_tucker": (lokr(lokr_t2=torch.randn(2, 2, 3, 3)), UnsupportedVariantError, "Tucker core"),
    "tucker_2d_mid": (layer(**{"lora_down.weight": torch.randn(2, 320), "lora_up.weight": torch.randn(320, 2), "lora_mid.weight": torch.randn(2, 2)}), FormatError, "mid has shape"),
    "dora": ({**GOOD, f"{Q}.dora_scale": torch.ones(1, 320)}, UnsupportedVariantError, "DoRA"),
    "oft": (layer(oft_blocks=torch.randn(4, 80, 80)), UnsupportedVariantError, "OFT"),
    "lycoris_full": (layer(diff=torch.randn(320, 320)), UnsupportedVariantError, "LyCORIS full"),
    "unknown_part": ({**GOOD, f"{Q}.something": torch.ones(1)}, FormatError, "unknown keys"),
    "no_key_scheme": ({"model.conv.weight": torch.ones(2)}, FormatError, "no LoRA key scheme"),
    "safeloras": ({"unet:0:down": torch.ones(2, 320), "unet:0:up": torch.ones(320, 2)}, UnsupportedVariantError, "safeloras"),
    "sdxl_width_on_sd15": (layer(**{"lora_down.weight": torch.ones(2, 640), "lora_up.weight": torch.ones(320, 2)}), KeyMismatchError, "wrong shape"),
    "corrupt_adapter_metadata": (({"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.ones(2, 320),
                                   "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": torch.ones(320, 2)},
                                  {"lora_adapter_metadata": "{broken"}), FormatError, "lora_adapter_metadata is not valid JSON"),
    "adapter_metadata_rank_lie": (({"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.ones(2, 320),
                                    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": torch.ones(320, 2)},
                                   {"lora_adapter_metadata": json.dumps({"unet.r": 8, "unet.lora_alpha": 8})}), FormatError, "declares rank 8"),
}


def write_case(folder: Path, name: str, content) -> Path:
    path = folder / f"{name}.safetensors"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        tensors, metadata = content if isinstance(content, tuple) else (content, None)
        save_file(tensors, path, metadata=metadata)
    return path


def test_corpus_is_large_enough():
    assert len(CASES) >= 40


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_file_is_a_named_studio_error(tmp_path, name):
    torch.manual_seed(0)
    content, error_class, problem = CASES[name]
    path = write_case(tmp_path, name, content)
    with pytest.raises(error_class, match=problem) as caught:
        load_adapter(path, "sd15")
    assert path.name in str(caught.value)


PEFT_CONFIGS = {
    "config_not_json": ("{nope", FormatError, "not valid JSON"),
    "config_alpha_string": (json.dumps({"r": 2, "lora_alpha": "8"}), FormatError, "lora_alpha must be a finite number"),
    "config_dora": (json.dumps({"r": 2, "lora_alpha": 2, "use_dora": True}), UnsupportedVariantError, "DoRA"),
    "config_pattern_list": (json.dumps({"r": 2, "lora_alpha": 2, "alpha_pattern": ["to_q"]}), FormatError, "alpha_pattern must be an object"),
}


@pytest.mark.parametrize("name", sorted(PEFT_CONFIGS))
def test_bad_adjacent_peft_config_is_a_named_error(tmp_path, name):
    text, error_class, problem = PEFT_CONFIGS[name]
    tensors = {"base_model.model.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.ones(2, 320),
               "base_model.model.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": torch.ones(320, 2)}
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    (tmp_path / "adapter_config.json").write_text(text)
    with pytest.raises(error_class, match=problem) as caught:
        load_adapter(tmp_path / "adapter_model.safetensors", "sd15")
    assert "adapter_config.json" in str(caught.value)


def test_one_folder_of_every_bad_file_still_reports_the_good_one(tmp_path):
    torch.manual_seed(0)
    for name, (content, _, _) in CASES.items():
        write_case(tmp_path, name, content)
    save_file(GOOD, tmp_path / "zz_good.safetensors")
    collection = load_collection([tmp_path], base="sd15")
    assert list(collection.adapters) == ["zz_good"]
    errors = {Path(info.path).stem: info.error for info in collection.infos if info.error}
    assert set(errors) == set(CASES)
    assert not any("unexpected" in text for text in errors.values())  # every one a StudioError, none by the safety net


def test_lycoris_rank_zero_refused_for_the_folder(tmp_path):
    save_file(GOOD, tmp_path / "good.safetensors")
    with pytest.raises(StudioError, match="lycoris_rank must be a positive integer"):
        load_collection([tmp_path], base="sd15", lycoris_rank=0)
