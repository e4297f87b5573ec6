"""SuperLoRA: parameter counts per grouping, G = L is layer-wise LoRA, shuffle is a permutation."""

from __future__ import annotations

import math

import pytest
import torch

from studio.adapters import lora_train, superlora
from tests.adapters.family_helpers import ALL, SHAPES, tree

FLAT = {name: (s[0], math.prod(s[1:])) for name, s in SHAPES.items()}
D = sum(o * i for o, i in FLAT.values())


def _build(**knobs):
    return superlora.build(superlora.Config(targets=ALL, **knobs), tree())


def _count(adapter):
    return sum(p.numel() for p in adapter.parameters() if p.requires_grad)


def _fill(adapter):
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_(torch.randn(p.shape, generator=generator))


def test_groups_equal_layers_is_layerwise_lora():
    adapter = _build(groups=4, rank=3)
    assert _count(adapter) == lora_train.expected_parameters(lora_train.Config(rank=3), SHAPES)


def test_one_group_lora_on_the_reshaped_whole():
    adapter = _build(groups=1, rank=3)
    a = math.ceil(math.sqrt(D))
    b = math.ceil(D / a)
    assert _count(adapter) == 3 * (a + b)


def test_kronecker_splits_count():
    adapter = _build(groups=1, splits=2, rank=2)
    a, b = math.ceil(math.sqrt(D)), math.ceil(D / math.ceil(math.sqrt(D)))
    s0, s1 = math.ceil(math.sqrt(a)), math.ceil(math.sqrt(b))
    assert _count(adapter) == 2 * 2 * (s0 + s1)


def test_tucker_order_and_projection_ratio_count():
    adapter = _build(groups=1, order=3, rank=2, rho=0.25)
    inner = math.ceil(0.25 * D)
    side = math.ceil(inner ** (1 / 3))
    dims = [side, side, side]
    while side * side * (dims[2] - 1) >= inner:
        dims[2] -= 1
    assert _count(adapter) == 2**3 + 2 * sum(dims)
    assert _count(adapter) < _count(_build(groups=1, order=3, rank=2))


def test_deltas_cover_every_layer_and_start_at_zero():
    for knobs in ({}, {"groups": 2, "splits": 2}, {"order": 3, "rho": 0.5, "shuffle": True, "groups": 3}):
        adapter = _build(**knobs)
        deltas = adapter.deltas()
        assert {k: tuple(v.shape) for k, v in deltas.items()} == FLAT
        assert all(float(v.abs().max()) == 0 for v in deltas.values())
        _fill(adapter)
        assert all(float(v.abs().max()) > 0 for v in adapter.deltas().values())


def test_shuffle_is_a_fixed_permutation():
    plain, mixed = _build(groups=2, shuffle=False), _build(groups=2, shuffle=True)
    mixed.groups = plain.groups  # same generated numbers, only the placement differs
    _fill(plain)
    flat_plain, flat_mixed = plain.flat().detach(), mixed.flat().detach()
    assert not torch.equal(flat_plain, flat_mixed)
    assert torch.equal(flat_plain.sort().values, flat_mixed.sort().values)


def test_too_many_unshuffled_groups_is_an_error():
    with pytest.raises(ValueError, match="groups=5"):
        _build(groups=5)
