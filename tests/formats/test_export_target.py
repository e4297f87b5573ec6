"""Trained-adapter export (issue 13 item 14): rank by the 1% error target, errors above it are warnings."""

from __future__ import annotations

import torch

from studio.bases import ModuleInfo, ModuleTree
from studio.train.export import TARGET, to_lora


class DenseAdapter:
    """An adapter without factors (like SuperLoRA): only layers() and delta()."""

    def __init__(self, rank: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.tree = ModuleTree("custom", {"unet.a": ModuleInfo("linear", (96, 64)), "unet.b": ModuleInfo("conv", (48, 32, 3, 3))})
        self._deltas = {}
        for name, info in self.tree.modules.items():
            out, inp = info.weight_shape[0], int(torch.Size(info.weight_shape[1:]).numel())
            self._deltas[name] = torch.randn(out, rank, generator=g) @ torch.randn(rank, inp, generator=g)

    def layers(self):
        return list(self._deltas)

    def delta(self, layer):
        return self._deltas[layer]


def test_dense_adapter_gets_the_rank_the_target_needs():
    adapter = DenseAdapter(rank=20)
    export = to_lora(adapter, 0, "x", adapter.tree)
    assert not export.exact and export.relative_error <= TARGET
    assert all(layer.rank <= 20 for layer in export.adapter.lora_layers.values())
    assert export.message().level == "info" and "relative error" in export.message().text
    assert export.adapter.lora_layers["unet.b"].down.shape[1:] == (32, 3, 3)
    for layer in adapter.layers():
        residual = (export.adapter.delta(layer) - adapter.delta(layer)).norm() / adapter.delta(layer).norm()
        assert float(residual) <= TARGET


def test_fixed_low_rank_export_is_a_warning_with_the_number():
    adapter = DenseAdapter(rank=20)
    export = to_lora(adapter, 4, "x", adapter.tree)
    message = export.message()
    assert export.relative_error > 0.1 and message.level == "warning"
    assert f"{export.relative_error:.4f}" in message.text
    assert export.adapter.notes[0].startswith("warning:")


def test_export_rank_must_not_be_negative():
    import pytest

    with pytest.raises(ValueError, match="export rank"):
        to_lora(DenseAdapter(rank=2), -3, "x")
