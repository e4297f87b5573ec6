"""In-place merging: bit-identical switching, pristine restore, mixing, key checks."""

from __future__ import annotations

import pytest
import torch

from studio.engine import Mix, MixTerm
from studio.errors import KeyMismatchError
from tests.engine.conftest import DeltaOnlyAdapter, attention_layers, random_lora


def snapshot(engine) -> dict[str, torch.Tensor]:
    return {name: module.weight.detach().clone() for name, module in engine.live.modules.items()}


def assert_equal_bits(a: dict, b: dict) -> None:
    different = [name for name in a if not torch.equal(a[name], b[name])]
    assert not different, f"{len(different)} weights differ, e.g. {different[:3]}"


def test_switch_round_trip_is_bit_identical(engine):
    a, b = random_lora(engine, "a", 1), random_lora(engine, "b", 2)
    pristine = snapshot(engine)
    with engine.applied(a, 0.7):
        once = snapshot(engine)
    for _ in range(5):
        engine.activate(a, 0.7)
        engine.activate(b)
        engine.activate([a, b])
    engine.activate(a, 0.7)
    assert_equal_bits(snapshot(engine), once)
    engine.restore()
    assert_equal_bits(snapshot(engine), pristine)


def test_applied_restores_pristine_even_after_an_error(engine):
    pristine = snapshot(engine)
    a = random_lora(engine, "a", 3)
    with pytest.raises(RuntimeError):
        with engine.applied(a):
            assert not torch.equal(engine.live.modules[a.layers()[0]].weight, pristine[a.layers()[0]])
            raise RuntimeError("boom")
    assert_equal_bits(snapshot(engine), pristine)
    assert not engine.live.touched


def test_applied_weight_is_w0_plus_scaled_delta(engine):
    a = random_lora(engine, "a", 4)
    layer = a.layers()[0]
    w0 = engine.live.modules[layer].weight.detach().clone()
    with engine.applied(a, 0.5):
        live = engine.live.modules[layer].weight.detach()
        torch.testing.assert_close(live, w0 + 0.5 * a.delta(layer).reshape(w0.shape), rtol=0, atol=1e-6)


def test_mix_equals_sum_of_deltas(engine):
    a, b = random_lora(engine, "a", 5), random_lora(engine, "b", 6, layers=attention_layers(engine)[:5])
    w0 = snapshot(engine)
    with engine.applied(Mix((MixTerm(a, 0.6, "a"), MixTerm(b, -0.3, "b"))), scale=2.0):
        live = snapshot(engine)
    for layer in a.layers():
        expected = 2.0 * (0.6 * a.delta(layer) + (-0.3 * b.delta(layer) if layer in b.layers() else 0))
        torch.testing.assert_close(live[layer] - w0[layer], expected.reshape(w0[layer].shape), rtol=1e-5, atol=1e-5)
    untouched = [n for n in live if n not in a.layers()]
    assert all(torch.equal(live[n], w0[n]) for n in untouched)


def test_factors_dense_and_delta_only_adapters_merge_alike(engine):
    a = random_lora(engine, "a", 7)
    dense_only = DeltaOnlyAdapter("dense", {layer: a.delta(layer) for layer in a.layers()})
    with engine.applied(a):
        via_factors = snapshot(engine)
    with engine.applied(dense_only):
        via_dense = snapshot(engine)
    for name in via_factors:
        torch.testing.assert_close(via_factors[name], via_dense[name], rtol=1e-5, atol=1e-6)


def test_conv_layers_merge_with_their_own_shape(engine):
    convs = [n for n, m in engine.live.modules.items() if isinstance(m, torch.nn.Conv2d) and n.startswith("unet.down_blocks.0")][:2]
    a = random_lora(engine, "conv", 8, layers=convs)
    w0 = snapshot(engine)
    with engine.applied(a):
        for layer in convs:
            live = engine.live.modules[layer].weight.detach()
            torch.testing.assert_close(live, w0[layer] + a.delta(layer).reshape(live.shape), rtol=1e-5, atol=1e-5)


def test_unknown_layers_raise_key_mismatch_with_count_and_examples(engine):
    a = random_lora(engine, "a", 9)
    a.lora_layers["unet.no_such_block.to_q"] = a.lora_layers[a.layers()[0]]
    a.lora_layers["unet.another_missing.to_k"] = a.lora_layers[a.layers()[0]]
    pristine = snapshot(engine)
    with pytest.raises(KeyMismatchError, match=r"targets 2 of \d+ layers.*no_such_block"):
        engine.activate(a)
    assert_equal_bits(snapshot(engine), pristine)


def test_wrong_shapes_raise_key_mismatch(engine):
    layer = attention_layers(engine)[0]
    out_features, in_features = engine.live.shape2d(layer)
    bad = DeltaOnlyAdapter("bad", {layer: torch.zeros(out_features + 1, in_features)})
    with pytest.raises(KeyMismatchError, match="shape"):
        engine.activate(bad)
    engine.restore()


def test_switch_rewrites_only_groups_that_differ(engine, monkeypatch):
    a = random_lora(engine, "a", 10)
    b = random_lora(engine, "b", 11, layers=attention_layers(engine)[:3])
    engine.activate(a)
    written = []
    for group in engine.live.groups:
        original = group.write
        monkeypatch.setattr(group, "write", lambda terms, group=group, original=original: (written.append(group), original(terms)))
    engine.activate([a, b])
    groups_of_b = {group for group in engine.live.groups if set(group.layers) & set(b.layers())}
    assert set(written) == groups_of_b and len(groups_of_b) < len(engine.live.groups)
    written.clear()
    engine.activate([a, b])
    assert written == []
    engine.restore()


def test_layers_of_one_shape_share_one_stacked_weight(engine):
    a = random_lora(engine, "a", 12)
    engine.release()  # forget the groups earlier tests formed
    engine.activate(a)
    by_shape = {}
    for layer in a.layers():
        by_shape.setdefault(tuple(engine.live.modules[layer].weight.shape), []).append(layer)
    assert len(engine.live.groups) == len(by_shape) < len(a.layers())
    for group in engine.live.groups:
        storage = {engine.live.modules[layer].weight.untyped_storage().data_ptr() for layer in group.layers}
        assert storage == {group.live.untyped_storage().data_ptr()}
    engine.restore()
