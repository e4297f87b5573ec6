"""Know your collection: LOO, baselines, verdict and near-duplicates on planted structure; the
streaming compress equals the in-memory oracle on both statistics routes."""

from __future__ import annotations

import math

import pytest
import torch

from studio.adapters.lora import LoraAdapter, LoraLayer
from studio.subspace.oracle import gram_compress, leave_one_out
from studio.subspace.report import svd_baseline
from tests.subspace.synthetic import SHAPES, compressed, in_span_adapter, random_adapter, shared_bases, shared_collection

LAYER = next(iter(SHAPES))


def _noisy(adapter: LoraAdapter, level: float, seed: int, name: str) -> LoraAdapter:
    """``adapter`` plus a relative ``level`` of random update on every layer (a later checkpoint)."""
    generator = torch.Generator().manual_seed(seed)
    layers = {}
    for layer_name, layer in adapter.lora_layers.items():
        down, up = layer.factors()
        scale = (level * float((up @ down).norm()) / (layer.rank * down.shape[1] * up.shape[0]) ** 0.5) ** 0.5  # |extra up @ extra down| ~ level |dW|
        extra_down = scale * torch.randn(layer.rank, down.shape[1], generator=generator)
        extra_up = scale * torch.randn(up.shape[0], layer.rank, generator=generator)
        layers[layer_name] = LoraLayer(torch.cat([down, extra_down]), torch.cat([up, extra_up], dim=1), 2.0 * layer.rank)
    return LoraAdapter(name, layers)


def _scaled(adapter: LoraAdapter, factor: float, name: str) -> LoraAdapter:
    return LoraAdapter(name, {n: LoraLayer(l.down, l.up, l.alpha * factor) for n, l in adapter.lora_layers.items()})


@pytest.mark.parametrize("count", [7, 20])  # 7 x rank 4: every layer on the Gram route; 20: covariance route + sketch
def test_streaming_equals_oracle_in_sample_and_leave_one_out(count):
    adapters = shared_collection(count, rank=4, true_k=12)
    streamed = compressed(adapters, k=5)
    oracle = gram_compress(adapters, k=5)
    for ours, theirs, loo in zip(streamed.adapters, oracle.adapters, leave_one_out(adapters, k=5)):
        assert ours.rel_error == pytest.approx(theirs.rel_error, rel=1e-5, abs=1e-7)
        assert ours.loo_error == pytest.approx(loo, rel=1e-5, abs=1e-7)
    assert streamed.report.loo_exact
    assert streamed.report.products_exact == (count == 7)


def test_spilled_factors_give_the_held_result():
    adapters = shared_collection(6, rank=4, true_k=8)
    held, spilled = compressed(adapters, k=6), compressed(adapters, k=6, held_bytes=0)
    assert [a.rel_error for a in held.adapters] == pytest.approx([a.rel_error for a in spilled.adapters], rel=1e-6)
    assert held.report.overall == pytest.approx(spilled.report.overall, rel=1e-6)


def test_shared_basis_with_noise_shares_structure():
    bases = shared_bases(6, seed=11)
    adapters = [_noisy(in_span_adapter(f"s{i}", bases, 4, seed=40 + i), 0.02, seed=i, name=f"s{i}") for i in range(10)]
    result = compressed(adapters, k=6)
    overall = result.report.overall
    assert overall["loo"] < 0.1 and overall["in_sample"] < 0.1  # the planted subspace carries every adapter
    assert overall["mean"] > 0.7  # random loadings: the mean adapter explains little
    assert overall["random"] > 0.9
    assert result.report.shares_structure is True and result.report.verdict.startswith("this collection shares structure: LOO 0.0")
    assert result.report.pairs == []  # related by the subspace, but no two updates alike


def test_unrelated_adapters_have_no_shared_structure():
    adapters = [random_adapter(f"u{i}", rank=4, seed=200 + i) for i in range(8)]
    result = compressed(adapters, k=4)
    overall = result.report.overall
    assert overall["loo"] > 0.9 and overall["random"] > 0.9 and overall["mean"] > 0.9
    assert result.report.shares_structure is False and result.report.verdict.startswith("no shared structure")
    assert "use per-adapter SVD instead" in result.report.verdict
    assert overall["svd"] < overall["in_sample"]  # for pure compression, per-adapter SVD wins here


def test_common_update_plus_noise_is_structure_of_the_mean_only():
    base = random_adapter("common", rank=4, seed=5)
    adapters = [_noisy(_scaled(base, 1.0 + 0.1 * i, f"m{i}"), 0.3, seed=300 + i, name=f"m{i}") for i in range(8)]
    result = compressed(adapters, k=4)
    overall = result.report.overall
    assert overall["mean"] < 0.4 and overall["random"] > 0.9
    assert overall["loo"] > 0.85 * overall["mean"]
    assert result.report.shares_structure is False and result.report.verdict.startswith("no structure beyond the mean adapter")


@pytest.mark.parametrize("others", [3, 18])  # Gram route (exact products) and covariance route (sketched)
def test_duplicates_rescaled_copies_and_checkpoints_are_found(others):
    first = random_adapter("a", rank=4, seed=1)
    adapters = [first, LoraAdapter("a_copy", first.lora_layers), _scaled(first, 2.5, "a_x2.5"), _noisy(first, 0.05, seed=2, name="a_later")]
    adapters += [random_adapter(f"other{i}", rank=4, seed=50 + i) for i in range(others)]
    result = compressed(adapters, k=4)
    pairs = {(p.first, p.second): p for p in result.report.pairs}
    assert pairs[("a", "a_copy")].kind == "exact duplicate" and pairs[("a", "a_copy")].rel_distance < 1e-4
    assert pairs[("a", "a_x2.5")].kind.startswith("rescaled copy (x2.5") and pairs[("a", "a_x2.5")].norm_ratio == pytest.approx(2.5, rel=1e-4)
    later = pairs[("a", "a_later")]
    assert later.cosine == pytest.approx(1 / math.sqrt(1 + 0.05**2), abs=0.01 if others > 3 else 2e-3)
    assert later.kind == "near duplicate"
    assert not any(name.startswith("other") for pair in pairs for name in pair)
    listed = result.as_json()["report"]["duplicates"]
    assert {(d["first"], d["second"]) for d in listed} == set(pairs)


def test_svd_baseline_keeps_the_largest_terms_per_number():
    singular = {"x": torch.tensor([4.0, 2.0, 1.0]), "y": torch.tensor([3.0, 0.5])}
    error = svd_baseline(singular, {"x": 10.0, "y": 10.0}, {"x": 10, "y": 5})
    total = 16 + 4 + 1 + 9 + 0.25
    # s^2 per number: y3 1.8, x4 1.6, x2 0.4, x1 0.1, y0.5 0.05; budget 20 takes y3 (5), x4 (10), skips x2 and x1 (10 each), takes y0.5 (5)
    assert error == pytest.approx(math.sqrt((4 + 1) / total))


def test_one_adapter_reports_no_loo_and_says_why():
    result = compressed([random_adapter("solo", rank=4)], k=4)
    assert result.adapters[0].loo_error is None and result.adapters[0].mean_error is None
    assert result.report.shares_structure is None and "too few adapters" in result.report.verdict


def test_explained_energy_mean_is_cumulative_over_layers_of_different_lengths():
    """Layers whose curves end early (a 3-wide layer) used to drop out of the app's average, so
    the averaged curve dipped; counted at their final value the mean never decreases."""
    shapes = {"unet.small.to_q": (3, 5), **SHAPES}
    adapters = [random_adapter(f"e{i}", rank=4, seed=70 + i, shapes=shapes) for i in range(4)]
    result = compressed(adapters, k=3)
    for side, curve in result.explained_mean().items():
        assert all(b >= a - 1e-7 for a, b in zip(curve, curve[1:])), side
        assert curve[-1] == pytest.approx(1.0, abs=1e-6)
    curves = [c[0] for c in result.explained.values()]
    dropping = [sum(c[j] for c in curves if j < len(c)) / sum(1 for c in curves if j < len(c)) for j in range(max(map(len, curves)))]
    assert any(b < a - 1e-3 for a, b in zip(dropping, dropping[1:]))  # the old average does dip here
    for sub in result.layers.values():
        assert torch.all(sub.down_explained[1:] >= sub.down_explained[:-1]) and float(sub.down_explained.max()) <= 1.0


def test_result_json_carries_the_report():
    result = compressed(shared_collection(5, rank=4, true_k=6), k=6)
    data = result.as_json()
    report = data["report"]
    assert set(report["overall"]) == {"in_sample", "loo", "mean", "random", "svd"}
    assert report["verdict"] == result.report.verdict and report["loo_exact"] is True
    assert [a["name"] for a in report["adapters"]] == [a.name for a in result.adapters]
    assert {"loo_error", "mean_error", "random_error", "svd_error"} <= set(data["adapters"][0])
    assert result.collection.report["verdict"] == result.report.verdict  # kept in the file's header


def test_leave_one_out_estimates_say_so_and_stay_close(monkeypatch):
    import studio.subspace.evaluate as evaluate

    adapters = [random_adapter(f"u{i}", rank=4, seed=200 + i) for i in range(10)]
    exact = leave_one_out(adapters, k=4)
    monkeypatch.setattr(evaluate, "LOO_MIN_DIRECTIONS", 1)  # m = 4 K = 16 < the 40 directions the sums have
    ritz = compressed(adapters, k=4)
    assert not ritz.report.loo_exact and "Rayleigh-Ritz" in ritz.report.loo_note
    assert max(abs(a.loo_error - b) for a, b in zip(ritz.adapters, exact)) < 5e-3
    monkeypatch.setattr(evaluate, "LOO_PAIRS", 10)  # 5 adapters x 2 layers
    monkeypatch.setattr(evaluate, "LOO_MIN_LAYERS", 1)
    monkeypatch.setattr(evaluate, "LOO_MAX_ADAPTERS", 5)
    sampled = compressed(adapters, k=4)
    assert "on 2 of 3 layers and 5 of 10 adapters: sampled" in sampled.report.loo_note
    assert sum(a.loo_error is not None for a in sampled.adapters) == 5


@pytest.mark.gpu
@pytest.mark.parametrize("count", [7, 20])
def test_cuda_compress_is_the_cpu_compress(count):
    """The same code on the GPU: components, errors, LOO and baselines within float tolerance."""
    adapters = shared_collection(count, rank=4, true_k=12)
    cpu, cuda = compressed(adapters, k=5), compressed(adapters, k=5, device="cuda")
    for layer, sub in cpu.layers.items():
        other = cuda.layers[layer]  # same subspaces (projectors), whatever the signs
        assert torch.allclose(sub.down_components.T @ sub.down_components, other.down_components.T @ other.down_components, atol=1e-4)
        assert torch.allclose(sub.up_components @ sub.up_components.T, other.up_components @ other.up_components.T, atol=1e-4)
    for a, b in zip(cpu.adapters, cuda.adapters):
        assert a.rel_error == pytest.approx(b.rel_error, rel=1e-4, abs=1e-6)
        assert a.loo_error == pytest.approx(b.loo_error, rel=1e-4, abs=1e-6)
        assert a.random_error == pytest.approx(b.random_error, rel=1e-6) and a.svd_error == pytest.approx(b.svd_error, rel=1e-6)
    assert cpu.report.overall == pytest.approx(cuda.report.overall, rel=1e-4)


@pytest.mark.gpu
def test_cuda_compress_keeps_factors_on_the_device_with_the_same_numbers(monkeypatch):
    """The store's device tier (factors left on the GPU between the passes): all, half or none of
    the adapters there give the same errors, LOO and baselines; the tier holds what its budget says."""
    from studio.subspace import store as store_mod

    held = []
    close = store_mod.FactorStore.close

    def recording(self):
        held.append((self.on_device, len(self)))
        close(self)

    monkeypatch.setattr(store_mod.FactorStore, "close", recording)
    adapters = shared_collection(20, rank=4, true_k=12)  # 80 stacked rows > every layer's width: all covariance route
    per_adapter = 4 * sum(layer.rank * (layer.in_features + layer.out_features) for layer in adapters[0].lora_layers.values())
    runs = [compressed(adapters, k=5, device="cuda", device_bytes=budget) for budget in (None, 10 * per_adapter, 0)]
    assert held == [(20, 20), (10, 20), (0, 20)]
    for other in runs[1:]:
        for a, b in zip(runs[0].adapters, other.adapters):
            assert a.rel_error == pytest.approx(b.rel_error, rel=1e-12, abs=1e-15)
            assert a.loo_error == pytest.approx(b.loo_error, rel=1e-12, abs=1e-15)
            assert a.random_error == pytest.approx(b.random_error, rel=1e-12) and a.svd_error == pytest.approx(b.svd_error, rel=1e-12)
