"""Extraction, projection and K choice on synthetic collections with known subspaces."""

from __future__ import annotations


import pytest
import torch

from studio.adapters.lora import LoraAdapter, LoraLayer
from studio.subspace import SubspaceSpec, SubspaceWarning, canonical, extract, project, project_adapter, reference_extract
from studio.subspace.oracle import leave_one_out, reconstruction_errors
from studio.subspace.project import error_parts
from tests.subspace.synthetic import SHAPES, compressed, in_span_adapter, random_adapter, shared_bases, shared_collection

LAYER = next(iter(SHAPES))


def test_shared_subspace_recovered_exactly_at_true_k():
    adapters = shared_collection(8, rank=4, true_k=6)
    result = compressed(adapters, k=6)
    assert max(a.rel_error for a in result.adapters) < 1e-5
    assert set(result.k.values()) == {6}
    bases = shared_bases(6)
    for layer, (down_basis, up_basis) in bases.items():
        sub = result.layers[layer]
        assert torch.dist(down_basis @ sub.down_components.T @ sub.down_components, down_basis) < 1e-5
        assert torch.dist(sub.up_components @ sub.up_components.T @ up_basis, up_basis) < 1e-5
        assert float(sub.down_explained[5]) == pytest.approx(1.0, abs=1e-6)
    smaller = compressed(adapters, k=3)
    assert min(a.rel_error for a in smaller.adapters) > 0.05


def test_components_are_orthonormal_and_deterministic():
    adapters = shared_collection(5, rank=4, true_k=8)
    first, second = compressed(adapters, k=5), compressed(adapters, k=5)
    for layer, sub in first.layers.items():
        assert torch.equal(sub.down_components, second.layers[layer].down_components)
        assert torch.equal(sub.up_components, second.layers[layer].up_components)
        assert torch.allclose(sub.down_components @ sub.down_components.T, torch.eye(5), atol=1e-5)
        assert torch.allclose(sub.up_components.T @ sub.up_components, torch.eye(5), atol=1e-5)


def _mean_collection(n: int, seed: int = 3) -> list[LoraAdapter]:
    """Down rows = shared mean vector + combinations of 4 directions (mean outside their span)."""
    generator = torch.Generator().manual_seed(seed)
    adapters = []
    bases = shared_bases(4, seed=seed)
    mean_down = {l: 3 * torch.randn(n_in, generator=generator) for l, (n_out, n_in) in SHAPES.items()}
    mean_up = {l: 3 * torch.randn(n_out, generator=generator) for l, (n_out, n_in) in SHAPES.items()}
    for i in range(n):
        layers = {}
        for layer, (down_basis, up_basis) in bases.items():
            down = torch.randn(4, 4, generator=generator) @ down_basis + mean_down[layer]
            up = up_basis @ torch.randn(4, 4, generator=generator) + mean_up[layer][:, None]
            layers[layer] = LoraLayer(down, up, 4.0)
        adapters.append(LoraAdapter(f"m{i}", layers))
    return adapters


def test_uncentred_beats_centred_reference_with_nonzero_mean():
    adapters = _mean_collection(10)
    ours = reconstruction_errors(adapters, k=5, method="ours")
    reference = reconstruction_errors(adapters, k=5, method="reference")
    assert max(ours) < 1e-5  # mean + 4 directions = 5: a true projection is exact
    assert min(reference) > 0.1  # the centred components miss the mean direction
    assert sum(ours) / len(ours) < 0.01 * sum(reference) / len(reference)


def test_canonical_is_balanced_and_exact():
    generator = torch.Generator().manual_seed(1)
    down, up = torch.randn(4, 32, generator=generator), torch.randn(48, 4, generator=generator)
    a, b = canonical(down, up, scale=0.5)
    assert torch.allclose(b @ a, 0.5 * up @ down, atol=1e-5)
    assert torch.allclose(a @ a.T, b.T @ b, atol=1e-4)  # both equal S
    assert torch.allclose(a @ a.T, torch.diag(torch.diagonal(a @ a.T)), atol=1e-4)


def test_canonical_makes_results_independent_of_scale_split():
    adapters = shared_collection(6, rank=4, true_k=10)
    generator = torch.Generator().manual_seed(7)
    split = []
    for adapter in adapters:
        layers = {}
        for name, layer in adapter.lora_layers.items():
            q = torch.linalg.qr(torch.randn(4, 4, generator=generator))[0]
            mixing = q @ torch.diag(torch.exp(torch.randn(4, generator=generator)))  # invertible, badly scaled
            layers[name] = LoraLayer(torch.linalg.solve(mixing, layer.down), layer.up @ mixing, layer.alpha)
        split.append(LoraAdapter(adapter.name, layers))
    plain, mixed = compressed(adapters, k=6), compressed(split, k=6)
    for before, after in zip(plain.adapters, mixed.adapters):
        assert after.rel_error == pytest.approx(before.rel_error, rel=1e-4)
    for layer, sub in plain.layers.items():
        assert torch.allclose(sub.down_components, mixed.layers[layer].down_components, atol=1e-4)
        assert torch.allclose(sub.up_components, mixed.layers[layer].up_components, atol=1e-4)


def test_k_clamped_with_warning_for_one_adapter():
    adapter = random_adapter("solo", rank=4)
    with pytest.warns(SubspaceWarning, match="K clamped"):
        result = compressed([adapter], k=10)
    assert set(result.k.values()) == {4}
    assert result.adapters[0].rel_error < 1e-5


def test_duplicated_adapters_clamp_and_reconstruct():
    adapter = random_adapter("a", rank=4)
    copies = [LoraAdapter(f"copy{i}", adapter.lora_layers) for i in range(3)]
    with pytest.warns(SubspaceWarning):
        first = compressed(copies, k=8)
    with pytest.warns(SubspaceWarning):
        second = compressed(copies, k=8)
    assert set(first.k.values()) == {4}
    assert all(a.rel_error < 1e-5 for a in first.adapters)
    for layer in first.layers:
        assert torch.equal(first.layers[layer].down_components, second.layers[layer].down_components)


def test_rank_deficient_layer_clamps_to_its_true_rank():
    generator = torch.Generator().manual_seed(2)
    down = torch.randn(8, 3, generator=generator) @ torch.randn(3, 32, generator=generator)  # rank 3 in a rank-8 LoRA
    adapter = LoraAdapter("deficient", {LAYER: LoraLayer(down, torch.randn(48, 8, generator=generator), 8.0)})
    with pytest.warns(SubspaceWarning):
        result = compressed([adapter], k=6)
    assert result.k[LAYER] == 3
    assert result.adapters[0].rel_error < 1e-5
    assert result.collection.export("deficient").lora_layers[LAYER].down.shape == (8, 32)


def test_one_side_spanning_less_is_completed_not_truncated():
    """All adapters share A but differ in B: K is not cut to the down side's span."""
    generator = torch.Generator().manual_seed(4)
    down = torch.randn(4, 32, generator=generator)
    adapters = [LoraAdapter(f"b{i}", {LAYER: LoraLayer(down, torch.randn(48, 4, generator=generator), 4.0)}) for i in range(3)]
    result = compressed(adapters, k=12)
    sub = result.layers[LAYER]
    assert sub.k == 12 and torch.allclose(sub.down_components @ sub.down_components.T, torch.eye(12), atol=1e-5)
    assert max(a.rel_error for a in result.adapters) < 1e-5


def test_mixed_ranks_share_one_subspace():
    bases = shared_bases(8, seed=5)
    adapters = [in_span_adapter(f"r{rank}", bases, rank, seed=rank) for rank in (2, 4, 8)]
    result = compressed(adapters, k=8)
    assert max(a.rel_error for a in result.adapters) < 1e-5
    for rank, adapter in zip((2, 4, 8), adapters):
        exported = result.collection.export(adapter.name)
        assert exported.lora_layers[LAYER].rank == rank
        assert exported.lora_layers[LAYER].alpha == rank


def test_partial_layer_coverage_uses_adapters_that_have_the_layer():
    bases = shared_bases(6, seed=6)
    second = list(SHAPES)[1]
    adapters = [in_span_adapter("partial", bases, 4, seed=1, layers=[LAYER])] + [in_span_adapter(f"full{i}", bases, 4, seed=10 + i) for i in range(3)]
    result = compressed(adapters, k=6)
    assert max(a.rel_error for a in result.adapters) < 1e-5
    assert result.collection.record("partial").ranks == {LAYER: 4}
    exported = result.collection.export("partial")
    assert exported.layers() == [LAYER]
    assert second in result.collection.export("full0").layers()


def test_unseen_adapter_out_of_span_reports_large_error():
    collection = compressed(shared_collection(8, rank=4, true_k=6), k=6).collection
    outside = project_adapter(collection, random_adapter("outside", rank=4, seed=123))
    assert outside.rel_error > 0.9
    inside = project_adapter(collection, in_span_adapter("inside", shared_bases(6), 4, seed=777))
    assert inside.rel_error < 1e-5
    assert inside.uncovered_layers == []


def test_uncovered_layers_count_as_lost():
    collection = compressed(shared_collection(4, rank=4, true_k=6), k=6).collection
    extra = random_adapter("extra", shapes={"unet.up_blocks.1.attentions.0.proj_in": (40, 40)})
    result = project_adapter(collection, extra)
    assert result.uncovered_layers == ["unet.up_blocks.1.attentions.0.proj_in"]
    assert result.rel_error == pytest.approx(1.0)


def test_energy_threshold_picks_smallest_k_and_reports_curves():
    adapters = shared_collection(8, rank=4, true_k=6)
    exact = compressed(adapters, energy=1.0)
    assert set(exact.k.values()) == {6}
    assert max(a.rel_error for a in exact.adapters) < 1e-5
    loose = compressed(adapters, energy=0.5)
    for layer, sub in loose.layers.items():
        needed = max(int((sub.down_explained < 0.5 - 1e-7).sum()) + 1, int((sub.up_explained < 0.5 - 1e-7).sum()) + 1)
        assert sub.k == needed < 6
        assert torch.all(sub.down_explained[1:] >= sub.down_explained[:-1])


def test_augment_adds_seeded_orthogonal_components():
    adapters = shared_collection(4, rank=4, true_k=6)
    spec = SubspaceSpec(k=6, augment=3, seed=1)
    downs = [canonical(*a.lora_layers[LAYER].factors())[0] for a in adapters]
    ups = [canonical(*a.lora_layers[LAYER].factors())[1] for a in adapters]
    sub = extract(downs, ups, spec)
    again = extract(downs, ups, spec)
    other = extract(downs, ups, SubspaceSpec(k=6, augment=3, seed=2))
    assert sub.k == 9 and sub.augment == 3 and sub.principal_k == 6
    assert torch.allclose(sub.down_components @ sub.down_components.T, torch.eye(9), atol=1e-5)
    assert torch.allclose(sub.up_components.T @ sub.up_components, torch.eye(9), atol=1e-5)
    assert torch.equal(sub.down_components, again.down_components)
    assert torch.equal(sub.down_components[:6], other.down_components[:6])
    assert not torch.allclose(sub.down_components[6:], other.down_components[6:])


def test_error_from_traces_matches_dense_computation():
    generator = torch.Generator().manual_seed(8)
    down, up = torch.randn(4, 32, generator=generator), torch.randn(48, 4, generator=generator)
    v = torch.linalg.qr(torch.randn(32, 5, generator=generator))[0].T
    u = torch.linalg.qr(torch.randn(48, 5, generator=generator))[0]
    alpha, beta = project(down, up, v, u)
    dense = up @ down - (u @ beta) @ (alpha @ v)
    parts = error_parts(down, up, v, u)
    assert parts.relative == pytest.approx(float(dense.norm() / (up @ down).norm()), rel=1e-5)


def test_leave_one_out_and_reference_extract_shapes():
    adapters = shared_collection(6, rank=4, true_k=6)
    errors = leave_one_out(adapters, k=6)
    assert len(errors) == 6 and max(errors) < 1e-4  # 5 others x rank 4 span the 6 shared directions
    sub = reference_extract([a.lora_layers[LAYER].down for a in adapters], [a.lora_layers[LAYER].up for a in adapters], k=3)
    assert sub.down_components.shape == (3, 32) and sub.up_components.shape == (48, 3)


def test_bad_spec_is_refused():
    with pytest.raises(ValueError, match="exactly one"):
        SubspaceSpec()
    with pytest.raises(ValueError, match="energy"):
        SubspaceSpec(energy=1.5)
