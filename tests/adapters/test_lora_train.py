"""Trainable LoRA: r * (in + out) numbers per layer, dW = (alpha / r) B A, starts at zero."""

from __future__ import annotations

import torch

from studio.adapters import lora_train
from studio.adapters.registry import select_layers
from tests.adapters.family_helpers import ALL, SHAPES, tree


def test_parameter_count_matches_the_formula():
    adapter = lora_train.build(lora_train.Config(rank=3, alpha=6, targets=ALL), tree())
    expected = sum(3 * (s[0] + (s[1] * (s[2] if len(s) == 4 else 1) * (s[3] if len(s) == 4 else 1))) for s in SHAPES.values())
    assert adapter.num_parameters() == expected == lora_train.expected_parameters(adapter.config, SHAPES)
    assert expected == 3 * ((32 + 48) + (32 + 24) + (40 + 40) + (16 + 72))


def test_delta_starts_at_zero_and_is_scaled_product():
    adapter = lora_train.build(lora_train.Config(rank=3, alpha=6, targets=ALL), tree())
    layer = "unet.mid_block.resnets.0.conv1"
    assert adapter.delta(layer).shape == (16, 72) and float(adapter.delta(layer).abs().max()) == 0
    with torch.no_grad():
        adapter.up[layer.replace(".", "__")].normal_()
    down, up = adapter.factors(layer)
    raw_up = adapter.up[layer.replace(".", "__")]
    assert torch.allclose(adapter.delta(layer), 2.0 * raw_up @ down)
    assert torch.allclose(up @ down, adapter.delta(layer))


def test_targets_select_by_suffix_or_glob():
    assert select_layers(tree(), ("to_q",)) == ["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"]
    assert len(select_layers(tree(), ("*attentions*",))) == 3
