"""Uni-LoRA: d trainable numbers, P^T P = I, only theta_d and the seed saved."""

from __future__ import annotations

import torch

from studio.adapters import unilora
from tests.adapters.family_helpers import ALL, SHAPES, tree


def _adapter(d=64, seed=7, rank=2):
    return unilora.build(unilora.Config(d=d, seed=seed, rank=rank, targets=ALL), tree())


def test_projection_is_isometric():
    adapter = _adapter()
    p = adapter.projection().to_dense()
    total = sum(2 * (s[0] + torch.Size(s[1:]).numel()) for s in SHAPES.values())
    assert p.shape == (total, 64)
    assert ((p != 0).sum(dim=1) == 1).all()
    assert torch.allclose(p.T @ p, torch.eye(64), atol=1e-6)
    theta = torch.randn(64)
    assert torch.allclose((p @ theta).norm(), theta.norm(), rtol=1e-5)
    assert torch.allclose(adapter.theta_full(), p @ adapter.theta_d.detach(), atol=1e-6)


def test_only_theta_d_is_trained_and_saved():
    adapter = _adapter()
    assert [name for name, p in adapter.named_parameters() if p.requires_grad] == ["theta_d"]
    assert sum(p.numel() for p in adapter.parameters()) == 64
    assert list(adapter.state_dict()) == ["theta_d"]


def test_same_seed_same_projection_and_conv_layers_covered():
    a, b, c = _adapter(seed=7), _adapter(seed=7), _adapter(seed=8)
    assert torch.equal(a.columns, b.columns) and not torch.equal(a.columns, c.columns)
    layer = "unet.mid_block.resnets.0.conv1"
    down, up = a.factors(layer)
    assert down.shape == (2, 72) and up.shape == (16, 2)
    assert torch.allclose(a.delta(layer), up @ down)
    bulk = a.all_factors()
    assert torch.equal(bulk[layer][0], down)
