"""`similar`: rank adapters by closeness of their updates; EigenLoRA training starting points."""

from __future__ import annotations

import pytest
import torch

from studio.adapters.eigenlora import EigenLoraConfig
from studio.adapters.lora import LoraAdapter
from studio.subspace import similar
from studio.subspace.training import nearest_adapter, trainable_adapter
from tests.subspace.synthetic import compressed, in_span_adapter, random_adapter, shared_bases, shared_collection
from tests.subspace.test_report import _noisy, _scaled


def _family():
    first = random_adapter("a", rank=4, seed=1)
    return first, [random_adapter("b", rank=4, seed=2), _scaled(first, 3.0, "a_x3"), _noisy(first, 0.2, seed=3, name="a_later"), LoraAdapter("a_copy", first.lora_layers)]


def test_similar_ranks_adapters_in_memory_exactly():
    query, others = _family()
    result = similar(query, others)
    assert [row.name for row in result.rows][:3] in (["a_copy", "a_x3", "a_later"], ["a_x3", "a_copy", "a_later"])
    rows = {row.name: row for row in result.rows}
    assert rows["a_copy"].kind == "exact duplicate" and rows["a_copy"].rel_distance < 1e-5
    assert rows["a_x3"].kind.startswith("rescaled copy (x3") and rows["a_x3"].norm_ratio == pytest.approx(3.0, rel=1e-5)
    assert rows["a_later"].cosine == pytest.approx(1 / (1 + 0.2**2) ** 0.5, abs=0.02)
    assert abs(rows["b"].cosine) < 0.2
    assert result.as_json()["rows"][0]["name"] in ("a_copy", "a_x3")


def test_similar_against_a_collection_uses_reconstructions():
    bases = shared_bases(6, seed=9)
    stored = [in_span_adapter(f"s{i}", bases, 4, seed=30 + i) for i in range(5)]
    result = compressed(stored, k=6)
    ranked = similar(stored[2], result.collection)
    assert ranked.rows[0].name == "s2" and ranked.rows[0].cosine == pytest.approx(1.0, abs=1e-5)
    assert ranked.rows[0].reconstruction_error < 1e-5
    assert similar(stored[2], result.path).rows[0].name == "s2"  # the file path works the same


def test_training_starts_zero_mean_or_nearest():
    adapters = shared_collection(4, rank=4, true_k=6)
    result = compressed(adapters, k=6)
    collection = result.collection
    layer = collection.names and next(iter(collection.layers))
    zero = trainable_adapter(collection, EigenLoraConfig(str(result.path), rank=4))
    assert float(zero.delta(layer).detach().abs().max()) == 0.0
    nearest = trainable_adapter(collection, EigenLoraConfig(str(result.path), rank=4, init="nearest", init_reference="lora_02"))
    stored = collection.adapter("lora_02")
    for name in stored.layers():
        assert torch.allclose(nearest.delta(name).detach(), stored.delta(name).detach(), atol=1e-5)
    mean = trainable_adapter(collection, EigenLoraConfig(str(result.path), rank=8, init="mean"))
    expected = sum(collection.adapter(n).delta(layer).detach() for n in collection.names) / len(collection.names)
    assert torch.allclose(mean.delta(layer).detach(), expected, atol=1e-5)
    trained = [p for p in mean.loadings() if p.requires_grad]
    loss = sum(mean.delta(n).square().sum() for n in mean.layers())
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in trained)  # no dead directions
    assert nearest_adapter(collection, "") in collection.names


def test_bad_init_options_are_refused():
    with pytest.raises(ValueError, match="init must be one of"):
        EigenLoraConfig(init="best")
    with pytest.raises(ValueError, match="init_reference"):
        EigenLoraConfig(init="mean", init_reference="x")
