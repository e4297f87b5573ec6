"""Batched code paths (canonical form, eigendecompositions, projections) equal the per-layer ones."""

from __future__ import annotations

import warnings

import pytest
import torch

from studio.adapters.lora import LoraAdapter, LoraLayer
from studio.subspace import SubspaceSpec, canonical, extract
from studio.subspace.canonical import _balanced, canonical_batch, fix_signs
from studio.subspace.extract import batched_eigh, directions_batch, layer_seed, directions_from_covariance, directions_from_covariances, directions_from_rows
from studio.subspace.project import error_parts, project
from studio.subspace.statistics import canonical_layers
from studio.subspace.oracle import fit_subspaces
from studio.subspace.reconstruct import collection_factors, reconstruct, reconstruct_all


def _layer(rank: int, n_in: int, n_out: int, generator: torch.Generator, deficient: int | None = None) -> LoraLayer:
    down, up = torch.randn(rank, n_in, generator=generator), torch.randn(n_out, rank, generator=generator)
    if deficient is not None:  # dW of rank `deficient` < r
        down[deficient:] = torch.randn(rank - deficient, deficient, generator=generator) @ down[:deficient]
        up[:, deficient:] = 0.0
    return LoraLayer(down, up, float(rank) / 2)


def _mixed_collection(n: int = 5, seed: int = 0) -> list[LoraAdapter]:
    """Mixed ranks across adapters, a rank-deficient layer, a rank above min(in, out), equal shapes."""
    generator = torch.Generator().manual_seed(seed)
    adapters = []
    for i in range(n):
        rank = 4 if i % 2 else 6
        layers = {
            "a.to_q": _layer(rank, 24, 24, generator),
            "a.to_k": _layer(rank, 24, 24, generator),
            "b.to_v": _layer(rank, 40, 16, generator, deficient=2),
            "c.small": _layer(rank, 5, 3, generator),
        }
        if i != 2:
            layers["d.partial"] = _layer(3, 12, 20, generator)
        adapters.append(LoraAdapter(f"m{i}", layers))
    return adapters


def _canonical_unbatched(down: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-adapter canonical form written out with 2-D calls only (the pre-batching code)."""
    q_up, r_up = torch.linalg.qr(up.double())
    q_down, r_down = torch.linalg.qr(down.double().T)
    u, s, vh = torch.linalg.svd(r_up @ r_down.T, full_matrices=False)
    left, signs = fix_signs(q_up @ u, dim=0)
    right = (vh @ q_down.T) * signs.unsqueeze(1)
    new_up, new_down = left * s.sqrt(), s.sqrt().unsqueeze(1) * right
    missing = down.shape[0] - new_down.shape[0]
    new_down = torch.cat([new_down, new_down.new_zeros(missing, new_down.shape[1])])
    new_up = torch.cat([new_up, new_up.new_zeros(new_up.shape[0], missing)], dim=1)
    return new_down.float(), new_up.float()


def test_fix_signs_batched_equals_per_matrix():
    vectors = torch.randn(3, 7, 5, dtype=torch.float64)
    for dim in (0, 1):
        batched, signs = fix_signs(vectors, dim)
        for i in range(3):
            single, single_signs = fix_signs(vectors[i], dim)
            assert torch.equal(batched[i], single) and torch.equal(signs[i], single_signs)


def test_batched_canonical_equals_per_adapter():
    adapters = _mixed_collection()
    layers = [layer for adapter in adapters for layer in adapter.lora_layers.values()]
    for layer, (down, up) in zip(layers, canonical_layers(layers)):
        single_down, single_up = canonical(*layer.factors())
        loop_down, loop_up = _canonical_unbatched(*layer.factors())
        assert torch.allclose(down, loop_down, atol=1e-6) and torch.allclose(up, loop_up, atol=1e-6)
        assert down.shape == single_down.shape and up.shape == single_up.shape
        assert torch.allclose(down, single_down, atol=1e-6) and torch.allclose(up, single_up, atol=1e-6)
        assert torch.allclose(up.double() @ down.double(), layer.delta().double(), atol=1e-5)
    downs = torch.stack([l.factors()[0] for l in layers if l.rank == 6 and l.in_features == 40])
    ups = torch.stack([l.factors()[1] for l in layers if l.rank == 6 and l.in_features == 40])
    batch_down, batch_up = canonical_batch(downs, ups)
    assert batch_down[:, 2:].abs().max() < 1e-6 and batch_up[:, :, 2:].abs().max() < 1e-6  # rank kept, zero tail


def test_canonical_ill_conditioned_full_rank_pair():
    """Gram matrices square the condition number: dW with singular values 1..1e-6, split between the
    factors balanced, through a random mixing M, or with 1..1e-5 all in up, still reconstructs in float64."""
    generator = torch.Generator().manual_seed(3)
    rank, n_in, n_out = 32, 80, 96
    u_, v_ = (torch.linalg.qr(torch.randn(n, rank, dtype=torch.float64, generator=generator))[0] for n in (n_out, n_in))
    mixing = torch.randn(rank, rank, dtype=torch.float64, generator=generator)
    for low, split in ((1e-6, "balanced"), (1e-6, "mixed"), (1e-5, "up")):
        s = torch.logspace(0, torch.log10(torch.tensor(low)).item(), rank, dtype=torch.float64)
        delta = (u_ * s) @ v_.T
        down, up = s.sqrt().unsqueeze(1) * v_.T, u_ * s.sqrt()
        if split == "mixed":
            down, up = torch.linalg.solve(mixing, down), up @ mixing
        elif split == "up":
            down, up = v_.T.clone(), u_ * s
        new_down, new_up = _balanced(down.unsqueeze(0), up.unsqueeze(0), 1.0)
        assert (new_up[0] @ new_down[0] - delta).norm() / delta.norm() < 1e-8, split
        assert torch.allclose((new_down[0] ** 2).sum(1), s, rtol=1e-6, atol=1e-12)  # balanced: |A rows|^2 = S
        loop_down, loop_up = _canonical_unbatched(down.float(), up.float())
        found_down, found_up = canonical_batch(down.float().unsqueeze(0), up.float().unsqueeze(0))
        assert (found_down[0] - loop_down).norm() <= 1e-6 * loop_down.norm() and (found_up[0] - loop_up).norm() <= 1e-6 * loop_up.norm()


def test_batched_directions_equal_per_layer():
    rows = torch.randn(4, 10, 30, dtype=torch.float64)
    rows[1, 5:] = 0.0  # rank-deficient member of the batch
    for found, single in zip(directions_batch(rows), (directions_from_rows(r) for r in rows)):
        assert found.vectors.shape == single.vectors.shape and torch.allclose(found.vectors, single.vectors, atol=1e-10)
        assert torch.allclose(found.energies, single.energies)
    covariances = rows.mT @ rows
    counts = [10, 3, 10, 40]
    for i, found in enumerate(directions_from_covariances(covariances, counts)):
        single = directions_from_covariance(covariances[i], counts[i])
        assert found.vectors.shape == single.vectors.shape and torch.allclose(found.vectors, single.vectors, atol=1e-10)
        assert torch.equal(found.energies, single.energies)


def test_batched_fit_and_reconstruct_equal_per_layer_path():
    adapters = _mixed_collection()
    spec = SubspaceSpec(k=5)
    collection = collection_factors(adapters)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layers = fit_subspaces(collection, spec)
        for name, sub in layers.items():
            pairs = [factors[name] for factors in collection if name in factors]
            single = extract([d for d, _ in pairs], [u for _, u in pairs], spec, layer_seed(spec.seed, name), warn=False)
            assert torch.allclose(sub.down_components, single.down_components, atol=1e-6)
            assert torch.allclose(sub.up_components, single.up_components, atol=1e-6)
            assert sub.principal_k == single.principal_k
    for factors, rebuilt in zip(collection, reconstruct_all(collection, layers)):
        for name, (down, up) in factors.items():
            alpha, beta = project(down, up, layers[name].down_components, layers[name].up_components)
            assert torch.allclose(rebuilt.loadings[name][0], alpha, atol=1e-6) and torch.allclose(rebuilt.loadings[name][1], beta, atol=1e-6)
            single = error_parts(down, up, layers[name].down_components, layers[name].up_components)
            assert abs(rebuilt.parts[name].residual - single.residual) <= 1e-9 * max(single.total, 1.0)
        assert rebuilt.total.relative == reconstruct(factors, layers).total.relative


def test_canonical_layers_of_mixed_dtypes_and_alphas_equal_per_layer():
    """Stored float16 and float32 factors with different alphas are cast and scaled after stacking."""
    generator = torch.Generator().manual_seed(3)
    layers = []
    for i, dtype in enumerate((torch.float16, torch.float32, torch.float16, torch.bfloat16)):
        down, up = torch.randn(4, 24, generator=generator), torch.randn(16, 4, generator=generator)
        layers.append(LoraLayer(down.to(dtype), up.to(dtype), alpha=1.0 + i))
    for layer, (down, up) in zip(layers, canonical_layers(layers)):
        single_down, single_up = canonical(*layer.factors())
        assert down.dtype == torch.float32
        assert torch.allclose(down, single_down, atol=1e-5) and torch.allclose(up, single_up, atol=1e-5)
        assert torch.allclose(up @ down, layer.delta(), atol=1e-5 * layer.delta().abs().max().item())


@pytest.mark.gpu
@pytest.mark.parametrize("count", [9, 80])
def test_batched_eigh_over_cuda_streams_equals_one_call(count):
    generator = torch.Generator().manual_seed(0)
    rows = torch.randn(count, 80, 120, generator=generator, dtype=torch.float64).cuda()
    gram = rows @ rows.mT
    values, vectors = batched_eigh(gram)
    expected_values, expected_vectors = torch.linalg.eigh(gram)
    assert values.shape == (count, 80) and vectors.shape == (count, 80, 80) and values.is_cuda and vectors.is_cuda
    assert torch.allclose(values, expected_values, rtol=1e-10, atol=1e-8)
    # eigenvectors up to sign: compare the reconstructions
    assert torch.allclose(vectors @ torch.diag_embed(values) @ vectors.mT, gram, atol=1e-8 * gram.abs().max().item())
    assert torch.allclose(vectors.abs(), expected_vectors.abs(), atol=1e-6)
