"""Applying any family to a UNet matches merging its deltas; export to a standard LoRA."""

from __future__ import annotations

import copy

import pytest
import torch

from studio.adapters import registry
from studio.bases import module_tree
from studio.engine.patch import Attachment
from studio.train.apply import count_trainable
from studio.train.export import to_lora
from tests.train.helpers import family_of


def _random(adapter, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    return adapter


@pytest.fixture(scope="module")
def unet_and_tree(tiny_pipeline_dir):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_pipeline_dir / "unet").eval()
    return unet, module_tree(str(tiny_pipeline_dir))


def _build(case, family_cases, tree, targets=None):
    knobs = dict(family_cases[case][0])
    if targets and family_of(case) != "eigenlora":
        knobs["targets"] = targets
    name = family_of(case)
    return registry.build_adapter(name, registry.make_config(name, knobs), tree)


@pytest.mark.parametrize("case", ["lora", "superlora", "superlora_tucker", "unilora", "eigenlora"])
def test_attached_forward_equals_merged_weights(case, family_cases, unet_and_tree):
    unet, tree = unet_and_tree
    targets = ("to_q", "to_v", "ff.net.2", "proj_in", "conv1")  # linears, 1x1 and 3x3 convs
    adapter = _random(_build(case, family_cases, tree, targets))
    inputs = (torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([10, 500]),
              torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(2)))
    with torch.no_grad():
        before = unet(inputs[0], inputs[1], encoder_hidden_states=inputs[2]).sample
        merged = copy.deepcopy(unet)
        for layer in adapter.layers():
            module = merged.get_submodule(layer.partition(".")[2])
            module.weight += adapter.delta(layer).reshape(module.weight.shape)
        expected = merged(inputs[0], inputs[1], encoder_hidden_states=inputs[2]).sample
        attached = Attachment({"unet": unet}, adapter)
        got = unet(inputs[0], inputs[1], encoder_hidden_states=inputs[2]).sample
        attached.detach()
        after = unet(inputs[0], inputs[1], encoder_hidden_states=inputs[2]).sample
    assert not torch.allclose(expected, before, atol=1e-4)
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4)
    assert torch.equal(after, before)


def test_eigenlora_counts_two_k_r_per_layer(family_cases, unet_and_tree):
    adapter = _build("eigenlora", family_cases, unet_and_tree[1])
    assert count_trainable(adapter) == len(adapter.layers()) * 2 * 8 * 4


@pytest.mark.parametrize("case", ["lora", "unilora", "eigenlora"])
def test_factored_families_export_exactly(case, family_cases, unet_and_tree):
    tree = unet_and_tree[1]
    adapter = _random(_build(case, family_cases, tree, ("to_q", "proj_in")))
    export = to_lora(adapter, 0, "x", tree)
    assert export.exact and export.relative_error == 0.0
    for layer in adapter.layers():
        assert torch.allclose(export.adapter.delta(layer), adapter.delta(layer).detach(), atol=1e-6)
        assert export.adapter.lora_layers[layer].down.dim() == len(tree.modules[layer].weight_shape)


@pytest.mark.parametrize("case", ["superlora", "superlora_tucker"])
def test_dense_families_export_by_svd_with_reported_error(case, family_cases, unet_and_tree):
    tree = unet_and_tree[1]
    adapter = _random(_build(case, family_cases, tree))
    low = to_lora(adapter, 2, "x", tree)
    full = to_lora(adapter, 64, "x", tree)
    assert not low.exact and 0.0 < low.relative_error < 1.0
    assert full.relative_error < 1e-5 < low.relative_error
    assert low.adapter.ranks == [2] and "relative error" in low.adapter.notes[0]
    layer = adapter.layers()[0]
    residual = (low.adapter.delta(layer) - adapter.delta(layer).detach()).norm() / adapter.delta(layer).detach().norm()
    assert abs(float(residual) - low.layer_errors[layer]) < 1e-4
