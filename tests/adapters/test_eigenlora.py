"""The EigenLoRA family module: frozen components, trainable loadings, exact LoRA export."""

from __future__ import annotations

import pytest
import torch

from studio.adapters.base import Adapter, LowRankAdapter
from studio.adapters.eigenlora import EigenLoraAdapter, EigenLoraConfig, EigenLoraLayer


def _components(k: int = 5, n_in: int = 32, n_out: int = 48, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    down = torch.linalg.qr(torch.randn(n_in, k, generator=generator))[0].T.contiguous()
    up = torch.linalg.qr(torch.randn(n_out, k, generator=generator))[0]
    return down, up


def _adapter(rank: int = 4) -> EigenLoraAdapter:
    generator = torch.Generator().manual_seed(1)
    layers = {}
    for name in ("unet.a.to_q", "unet.a.to_k"):
        down, up = _components()
        layers[name] = EigenLoraLayer(down, up, torch.randn(rank, 5, generator=generator), torch.randn(5, rank, generator=generator))
    return EigenLoraAdapter("e", layers, {"origin": "test"})


def test_answers_the_adapter_contract():
    adapter = _adapter()
    assert isinstance(adapter, Adapter) and isinstance(adapter, LowRankAdapter)
    assert adapter.layers() == ["unet.a.to_q", "unet.a.to_k"]
    down, up = adapter.factors("unet.a.to_q")
    assert down.shape == (4, 32) and up.shape == (48, 4)
    layer = adapter.layer("unet.a.to_q")
    expected = (layer.up_components @ layer.beta) @ (layer.alpha @ layer.down_components)
    assert torch.allclose(adapter.delta("unet.a.to_q"), expected, atol=1e-6)
    assert torch.allclose(up @ down, adapter.delta("unet.a.to_q"), atol=1e-6)


def test_only_loadings_are_trainable():
    adapter = _adapter()
    names = {name for name, _ in adapter.named_parameters()}
    assert names == {f"layer_modules.{i}.{p}" for i in range(2) for p in ("alpha", "beta")}
    assert {name for name, _ in adapter.named_buffers()} == {f"layer_modules.{i}.{b}" for i in range(2) for b in ("down_components", "up_components")}
    loss = sum(adapter.delta(layer).square().sum() for layer in adapter.layers())
    loss.backward()
    assert all(p.grad is not None for p in adapter.loadings())
    assert adapter.num_trainable() == 2 * 2 * 4 * 5


def test_to_lora_is_exact():
    adapter = _adapter(rank=6)
    lora = adapter.to_lora()
    for layer in adapter.layers():
        assert torch.allclose(lora.delta(layer), adapter.delta(layer).detach(), atol=1e-6)
        assert lora.lora_layers[layer].alpha == lora.lora_layers[layer].rank == 6
    assert lora.metadata == {"origin": "test"}


def test_to_lora_restores_conv_shapes():
    down, up = _components(k=3, n_in=4 * 9, n_out=8)
    layer = EigenLoraLayer(down, up, torch.randn(2, 3), torch.randn(3, 2))
    adapter = EigenLoraAdapter("conv", {"unet.conv_in": layer}, weight_shapes={"unet.conv_in": ((2, 4, 3, 3), (8, 2, 1, 1))})
    lora = adapter.to_lora()
    assert lora.lora_layers["unet.conv_in"].down.shape == (2, 4, 3, 3)
    assert torch.allclose(lora.delta("unet.conv_in"), adapter.delta("unet.conv_in").detach(), atol=1e-6)


def test_new_adapter_starts_at_zero_update():
    adapter = EigenLoraAdapter.new("fresh", {"unet.a.to_q": _components()}, rank=8, seed=3)
    assert float(adapter.delta("unet.a.to_q").detach().abs().max()) == 0.0
    assert adapter.layer("unet.a.to_q").alpha.abs().max() > 0


def test_bad_shapes_and_configs_are_refused():
    down, up = _components()
    with pytest.raises(ValueError, match="do not fit"):
        EigenLoraLayer(down, up, torch.zeros(4, 6), torch.zeros(5, 4))
    with pytest.raises(ValueError, match="k must be"):
        EigenLoraConfig(k=0)
    with pytest.raises(KeyError, match="no layer"):
        _adapter().delta("unet.missing")


def test_collection_adapters_share_their_basis_and_core_rebuilds_delta(tmp_path):
    from tests.subspace.synthetic import compressed, shared_collection

    adapters = shared_collection(n=3, true_k=4)
    collection = compressed(adapters, k=4).collection
    first, second = collection.adapter(adapters[0].name), collection.adapter(adapters[1].name)
    layer = first.layers()[0]
    assert all(a is b for a, b in zip(first.basis(layer), second.basis(layer)))
    down_basis, up_basis = first.basis(layer)
    assert torch.allclose(up_basis @ first.core(layer) @ down_basis, first.delta(layer), atol=1e-5)
