"""The compressed collection file: round trip, export, bad files."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from studio.adapters.eigenlora import EigenLoraConfig
from studio.errors import FormatError
from studio.subspace import CompressedCollection, compress_sources, export_from_collection, held_sources
from studio.subspace.collection import RECONSTRUCTION_KEYS
from studio.subspace.training import trainable_adapter
from tests.subspace.synthetic import SHAPES, relative_delta_error, shared_collection

LAYER = next(iter(SHAPES))


@pytest.fixture()
def saved(tmp_path):
    adapters = shared_collection(5, rank=4, true_k=8)
    path = tmp_path / "zoo.safetensors"
    result = compress_sources(held_sources(adapters), path, k=6, base_id="sdxl-test")
    return adapters, result, path


def test_round_trip_gives_identical_tensors(saved):
    adapters, result, path = saved
    loaded = CompressedCollection.load(path)
    assert loaded.names == [a.name for a in adapters]
    assert loaded.base_id == "sdxl-test"
    assert result.bytes_out == path.stat().st_size
    for layer, sub in result.layers.items():
        assert torch.equal(loaded.layers[layer].down_components, sub.down_components)
        assert torch.equal(loaded.layers[layer].up_components, sub.up_components)
        assert torch.equal(loaded.layers[layer].down_explained, sub.down_explained)
    for adapter in adapters:
        in_memory, on_disk = result.collection.loadings(adapter.name), loaded.loadings(adapter.name)
        for layer, (alpha, beta) in in_memory.items():
            assert torch.equal(alpha, on_disk[layer][0]) and torch.equal(beta, on_disk[layer][1])
        record = loaded.record(adapter.name)
        assert record.metadata == adapter.metadata
        assert record.ranks == {l: 4 for l in SHAPES} and record.alphas == {l: 2.0 for l in SHAPES}
        assert len(record.sha256) == 64


def test_export_delta_equals_collection_adapter_delta(saved):
    adapters, result, path = saved
    for adapter in adapters:
        exported = export_from_collection(path, adapter.name)
        stored = CompressedCollection.load(path).adapter(adapter.name)
        for layer in adapter.layers():
            assert torch.allclose(exported.delta(layer), stored.delta(layer), atol=1e-6)
            assert exported.lora_layers[layer].alpha == exported.lora_layers[layer].rank == 4
        error = sum(relative_delta_error(adapter, exported, l) ** 2 for l in SHAPES) ** 0.5
        assert error < 3 * result.adapters[adapters.index(adapter)].rel_error + 1e-5
        assert {k: v for k, v in exported.metadata.items() if k not in RECONSTRUCTION_KEYS} == adapter.metadata
        assert exported.metadata["studio.reconstructed_from"] == "zoo.safetensors"
        assert float(exported.metadata["studio.reconstruction_error"]) == pytest.approx(result.adapters[adapters.index(adapter)].rel_error, rel=1e-5)


def test_unknown_adapter_name_is_a_clear_error(saved):
    _, _, path = saved
    with pytest.raises(KeyError, match="no adapter 'nope'"):
        CompressedCollection.load(path).export("nope")


def test_new_adapter_trains_only_loadings(saved):
    _, _, path = saved
    collection = CompressedCollection.load(path)
    adapter = trainable_adapter(collection, EigenLoraConfig(str(path), k=4, augment=2, seed=3, rank=8))
    layer = adapter.layer(LAYER)
    assert layer.alpha.shape == (8, 6) and layer.beta.shape == (6, 8)
    assert torch.equal(layer.down_components[:4], collection.layers[LAYER].down_components[:4])
    assert torch.allclose(layer.down_components @ layer.down_components.T, torch.eye(6), atol=1e-5)
    assert {id(p) for p in adapter.parameters()} == {id(p) for p in adapter.loadings()}
    assert float(adapter.delta(LAYER).detach().abs().max()) == 0.0


def _rewrite(path, out, change):
    tensors = load_file(str(path))
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    change(tensors, metadata)
    save_file(tensors, str(out), metadata=metadata)


def test_truncated_file_error_names_the_file(saved, tmp_path):
    _, _, path = saved
    bad = tmp_path / "truncated.safetensors"
    bad.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(FormatError, match="truncated.safetensors"):
        CompressedCollection.load(bad)


def test_wrong_component_shape_error_names_file_and_tensor(saved, tmp_path):
    _, _, path = saved
    bad = tmp_path / "wrong_shape.safetensors"
    _rewrite(path, bad, lambda t, m: t.__setitem__("layer.0.down_components", torch.zeros(5, 7)))
    with pytest.raises(FormatError, match=r"wrong_shape.safetensors.*layer\.0\.down_components"):
        CompressedCollection.load(bad)


def test_not_orthonormal_components_are_refused(saved, tmp_path):
    _, _, path = saved
    bad = tmp_path / "garbage.safetensors"
    _rewrite(path, bad, lambda t, m: t.__setitem__("layer.1.up_components", 3 * t["layer.1.up_components"]))
    with pytest.raises(FormatError, match="garbage.safetensors.*orthonormal"):
        CompressedCollection.load(bad)


def test_wrong_loadings_size_fails_when_read(saved, tmp_path):
    _, _, path = saved
    bad = tmp_path / "short.safetensors"
    _rewrite(path, bad, lambda t, m: t.__setitem__("adapter.2.loadings", t["adapter.2.loadings"][:-3].clone()))
    collection = CompressedCollection.load(bad)
    collection.adapter("lora_00")
    with pytest.raises(FormatError, match="short.safetensors.*lora_02.*loadings"):
        collection.adapter("lora_02")


def test_plain_lora_file_is_not_a_collection(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file({"x.lora_down.weight": torch.zeros(2, 3)}, str(path))
    with pytest.raises(FormatError, match="plain.safetensors.*not a compressed collection"):
        CompressedCollection.load(path)


def test_invalid_metadata_json_is_refused(saved, tmp_path):
    _, _, path = saved
    bad = tmp_path / "badjson.safetensors"
    _rewrite(path, bad, lambda t, m: m.__setitem__("studio.collection", "{not json"))
    with pytest.raises(FormatError, match="badjson.safetensors.*studio.collection"):
        CompressedCollection.load(bad)


def test_header_is_padded_and_standard(saved):
    _, _, path = saved
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    assert length % 8 == 0
    header = json.loads(raw[8 : 8 + length])
    assert header["__metadata__"]["studio.format"] == "studio.eigenlora-collection"
    assert set(load_file(str(path))) == set(header) - {"__metadata__"}
