"""Bad files get a clear error naming the file and the problem; nothing is unpickled or touched."""

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
from studio.formats import load_adapter, read_header, save_adapter
from studio.formats.safe import MAX_TENSORS

UNET_Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"


def kohya_layer(stem: str = UNET_Q, rank: int = 4, width: int = 320, alpha: float | None = 2.0) -> dict[str, torch.Tensor]:
    tensors = {f"{stem}.lora_down.weight": torch.randn(rank, width), f"{stem}.lora_up.weight": torch.randn(width, rank)}
    if alpha is not None:
        tensors[f"{stem}.alpha"] = torch.tensor(alpha)
    return tensors


def write(path: Path, tensors: dict, metadata: dict | None = None) -> Path:
    save_file(tensors, path, metadata=metadata)
    return path


class Exploding:
    """Unpickling this would write a marker file: the test checks it never appears."""

    marker: Path

    def __reduce__(self):
        return (Path.write_text, (self.marker, "unpickled!"))


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".bin", ".safetensors"])
def test_pickle_is_refused_never_unpickled(tmp_path, suffix):
    Exploding.marker = tmp_path / "marker"
    path = tmp_path / f"evil{suffix}"
    path.write_bytes(pickle.dumps(Exploding()))
    with pytest.raises(UnsafeFileError, match=str(path.name)):
        load_adapter(path, "sd15")
    assert not Exploding.marker.exists()


def test_torch_zip_checkpoint_is_refused(tmp_path):
    path = tmp_path / "model.safetensors"
    torch.save({"a": torch.zeros(2)}, path)  # a zip archive holding a pickle
    with pytest.raises(UnsafeFileError, match="pickle"):
        load_adapter(path, "sd15")


def test_truncated_file(tmp_path):
    path = write(tmp_path / "t.safetensors", kohya_layer())
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(FormatError, match=r"t\.safetensors.*(truncated|does not fit)"):
        load_adapter(path, "sd15")


def test_header_length_larger_than_file(tmp_path):
    path = tmp_path / "h.safetensors"
    path.write_bytes(struct.pack("<Q", 10_000) + b'{"a": 1}')
    with pytest.raises(FormatError, match="larger than the file"):
        read_header(path)


def test_huge_header_refused_before_reading(tmp_path):
    path = tmp_path / "huge.safetensors"
    path.write_bytes(struct.pack("<Q", 2**40) + b"{" + b" " * 100)
    with pytest.raises(FormatError, match="exceeds the cap"):
        read_header(path)


def test_invalid_json_and_not_safetensors(tmp_path):
    path = tmp_path / "j.safetensors"
    body = b"{not json"
    path.write_bytes(struct.pack("<Q", len(body)) + body)
    with pytest.raises(FormatError, match="invalid header JSON"):
        read_header(path)
    text = tmp_path / "readme.safetensors"
    text.write_text("hello, I am a text file")
    with pytest.raises(FormatError, match="readme.safetensors"):
        load_adapter(text, "sd15")


def _raw_safetensors(path: Path, header: dict) -> Path:
    body = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body)) + body)
    return path


def test_too_many_tensors_and_overflowing_shapes(tmp_path):
    many = {f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for i in range(MAX_TENSORS + 1)}
    with pytest.raises(FormatError, match="exceed the cap"):
        read_header(_raw_safetensors(tmp_path / "many.safetensors", many))
    overflow = {"x": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 16]}}
    with pytest.raises(FormatError, match="over the cap"):
        read_header(_raw_safetensors(tmp_path / "overflow.safetensors", overflow))
    lying = {"x": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4000]}}
    with pytest.raises(FormatError, match="does not fit"):
        read_header(_raw_safetensors(tmp_path / "lying.safetensors", lying))


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_flagged(tmp_path, value):
    tensors = kohya_layer()
    tensors[f"{UNET_Q}.lora_up.weight"][0, 0] = value
    with pytest.raises(FormatError, match="NaN or inf"):
        load_adapter(write(tmp_path / "nan.safetensors", tensors), "sd15")


def test_fp16_overflow_flagged(tmp_path):
    tensors = {k: v.half() for k, v in kohya_layer().items()}
    tensors[f"{UNET_Q}.lora_up.weight"] = torch.full((320, 4), 70000.0).half()  # overflows to inf
    with pytest.raises(FormatError, match="NaN or inf"):
        load_adapter(write(tmp_path / "ovf.safetensors", tensors), "sd15")


def test_down_up_shape_mismatch_is_a_format_error(tmp_path):
    tensors = kohya_layer()
    tensors[f"{UNET_Q}.lora_up.weight"] = torch.randn(320, 8)  # rank 8 vs down's 4
    with pytest.raises(FormatError, match="do not fit"):
        load_adapter(write(tmp_path / "rank.safetensors", tensors), "sd15")
    tensors = kohya_layer()
    del tensors[f"{UNET_Q}.lora_up.weight"]
    with pytest.raises(FormatError, match="has no up weight"):
        load_adapter(write(tmp_path / "half.safetensors", tensors), "sd15")


def test_missing_alpha_defaults_to_rank_and_says_so(tmp_path):
    adapter = load_adapter(write(tmp_path / "noalpha.safetensors", kohya_layer(alpha=None)), "sd15")
    layer = adapter.lora_layers["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"]
    assert layer.alpha == 4 and layer.alpha_source == "rank-default" and layer.scale == 1.0
    assert any("alpha = rank" in note for note in adapter.notes)


def test_zero_and_tensor_alpha(tmp_path):
    zero = load_adapter(write(tmp_path / "zero.safetensors", kohya_layer(alpha=0.0)), "sd15")
    assert any("alpha is 0" in note and "alpha = rank" in note for note in zero.notes)
    layer = zero.lora_layers[zero.layers()[0]]
    assert layer.alpha == layer.rank and layer.scale == 1.0  # kohya's LoRAModule and LyCORIS: alpha 0 -> rank
    tensors = kohya_layer()
    tensors[f"{UNET_Q}.alpha"] = torch.ones(3)
    with pytest.raises(FormatError, match="expected a scalar"):
        load_adapter(write(tmp_path / "vec.safetensors", tensors), "sd15")


def test_unknown_keys_and_unknown_scheme(tmp_path):
    tensors = kohya_layer()
    tensors[f"{UNET_Q}.something_else"] = torch.zeros(1)
    with pytest.raises(FormatError, match="unknown keys"):
        load_adapter(write(tmp_path / "unknown.safetensors", tensors), "sd15")
    with pytest.raises(FormatError, match="no LoRA key scheme"):
        load_adapter(write(tmp_path / "model.safetensors", {"conv.weight": torch.zeros(2)}), "sd15")


def test_dora_refused_by_name(tmp_path):
    tensors = kohya_layer()
    tensors[f"{UNET_Q}.dora_scale"] = torch.ones(1, 320)
    with pytest.raises(UnsupportedVariantError, match="DoRA"):
        load_adapter(write(tmp_path / "dora.safetensors", tensors), "sd15")


def test_other_base_refused_with_counts_and_guess(tmp_path):
    tensors = kohya_layer("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k", width=640)
    tensors["lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight"] = torch.randn(4, 2048)
    path = write(tmp_path / "sdxl.safetensors", tensors)
    with pytest.raises(KeyMismatchError, match=r"0 of 1 layers match.*1 match a name with the wrong shape.*SDXL"):
        load_adapter(path, "sd15")


def test_partial_coverage_loads_what_matches(tmp_path):
    tensors = kohya_layer()
    tensors.update(kohya_layer("lora_te2_text_model_encoder_layers_0_self_attn_q_proj", width=1280))
    adapter = load_adapter(write(tmp_path / "partial.safetensors", tensors), "sd15")
    assert adapter.layers() == ["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"]
    assert any("1 layers match no module" in note and "lora_te2_" in note for note in adapter.notes)


def test_huge_metadata_shown_truncated_import_works(tmp_path):
    frequency = json.dumps({"set": {f"tag{i}": i for i in range(50_000)}})
    path = write(tmp_path / "meta.safetensors", kohya_layer(), {"ss_tag_frequency": frequency, "ss_network_dim": "4"})
    infos = load_collection([path], base="sd15").infos
    assert infos[0].error is None
    assert infos[0].metadata["ss_tag_frequency"].endswith(f"({len(frequency)} chars)")
    assert len(infos[0].metadata["ss_tag_frequency"]) < 2100
    assert infos[0].trigger_words[0] == "tag49999"


def test_non_string_metadata_is_read(tmp_path):
    path = write(tmp_path / "m.safetensors", kohya_layer())
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    header["__metadata__"] = {"ss_network_dim": 4, "nested": {"a": [1, 2]}}
    body = json.dumps(header).encode()
    body += b" " * ((8 - len(body) % 8) % 8)
    path.write_bytes(struct.pack("<Q", len(body)) + body + raw[8 + length :])
    adapter = load_adapter(path, "sd15")
    assert adapter.metadata["ss_network_dim"] == "4" and json.loads(adapter.metadata["nested"]) == {"a": [1, 2]}


def test_collection_keeps_good_files_and_reports_bad_ones(tmp_path):
    good = write(tmp_path / "good.safetensors", kohya_layer())
    (tmp_path / "evil.ckpt").write_bytes(b"\x80\x04not really")
    write(tmp_path / "sd2.safetensors", kohya_layer("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k", width=320) | {
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight": torch.randn(4, 1024)})
    sub = tmp_path / "sub"
    sub.mkdir()
    write(sub / "good.safetensors", kohya_layer())
    collection = load_collection([tmp_path, sub / "good.safetensors"], base="sd15")
    assert list(collection.adapters) == ["good"]
    errors = {Path(info.path).name: info.error for info in collection.infos if info.error}
    assert "pickle" in errors["evil.ckpt"] and "SD2.x" in errors["sd2.safetensors"]
    assert any("duplicate adapter name 'good'" in (info.error or "") for info in collection.infos)
    assert good.exists()


def test_empty_folder(tmp_path):
    with pytest.raises(StudioError, match="no adapter files"):
        load_collection([tmp_path])


def test_export_never_overwrites_its_input(tmp_path):
    from studio.verbs.export import ExportRequest, run

    path = write(tmp_path / "in.safetensors", kohya_layer())
    before = path.read_bytes()
    with pytest.raises(StudioError, match="overwrite"):
        run(ExportRequest(str(path), str(path), base="sd15"))
    assert path.read_bytes() == before


def test_failed_write_keeps_previous_file(tmp_path, monkeypatch):
    import studio.fileio

    path = write(tmp_path / "out.safetensors", kohya_layer())
    before = path.read_bytes()
    adapter = load_adapter(path, "sd15")

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(studio.fileio, "save_file", crash)
    with pytest.raises(OSError):
        save_adapter(adapter, path, "diffusers")
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["out.safetensors"]
