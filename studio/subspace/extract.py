"""Principal subspaces of one layer of a LoRA collection (EigenLoRAx), pure math on tensors.

The down matrices of N adapters, stacked as rows (N*r x in), span a row space; its principal
directions are the down components V_A (K x in, orthonormal rows). The up matrices, stacked as
columns (out x N*r), give the up components U_B (out x K). Directions come from a symmetric
eigendecomposition of the smaller of the two Gram matrices (N*r x N*r or d x d), in float64,
on the tensors' device. The SVD is uncentred: the mean direction stays in the subspace, so the
reconstruction is a true orthogonal projection (`reference_extract` is the centred baseline).
"""

from __future__ import annotations

import functools
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch import Tensor

from studio.subspace.canonical import fix_signs

# Eigenvalue / largest eigenvalue under which a direction is float32 rounding noise. Eigenvalues
# of sum A^T A for balanced factors are sums of singular values of dW (not their squares), so
# this is a relative singular-value level of dW: directions below it carry < 1e-6 of an update.
RANK_TOLERANCE = 1e-6
MAX_CURVE = 1024  # explained-energy curves are kept up to this many components
BATCH_ELEMENTS = 1 << 26  # numbers per stacked batch (512 MiB in float64): bounds batched memory


class SubspaceWarning(UserWarning):
    """K (or P) was clamped to what the collection and the layer shapes allow."""


@dataclass(frozen=True)
class SubspaceSpec:
    """How many components per layer: a fixed ``k`` or an explained-``energy`` fraction, plus
    ``augment`` extra random components orthogonal to them (seeded by ``seed``)."""

    k: int | None = None
    energy: float | None = None
    augment: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if (self.k is None) == (self.energy is None):
            raise ValueError("give exactly one of k (components per layer) or energy (fraction in (0, 1])")
        if self.k is not None and self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if self.energy is not None and not 0.0 < self.energy <= 1.0:
            raise ValueError(f"energy must be in (0, 1], got {self.energy}")
        if self.augment < 0:
            raise ValueError(f"augment must be >= 0, got {self.augment}")

    def as_json(self) -> dict:
        return {"k": self.k, "energy": self.energy, "augment": self.augment, "seed": self.seed}


@dataclass
class Directions:
    """Principal directions of a set of vectors: ``vectors`` (d, m) orthonormal columns above the
    rank tolerance (the leading ``limit`` of them when the caller needs no more), ``energies`` every
    eigenvalue (descending, float64) of the Gram matrix, ``kept`` how many lie above the tolerance."""

    vectors: Tensor
    energies: Tensor
    count: int  # how many vectors were stacked (sum of ranks)
    kept: int | None = None  # directions above the tolerance (None: all of ``vectors``)

    @property
    def rank(self) -> int:
        """How many directions lie above the rank tolerance (``vectors`` may hold fewer)."""
        return self.vectors.shape[1] if self.kept is None else self.kept


@dataclass
class LayerSubspace:
    """The components of one layer and how they were chosen.

    ``down_components`` (K, in) and ``up_components`` (out, K) have orthonormal rows / columns.
    The first ``principal_k`` come from the data (padded with orthonormal completion on a side
    that spans fewer directions), the last ``augment`` are seeded random directions.
    ``*_explained`` are cumulative explained-energy fractions (1-D, float32).
    """

    down_components: Tensor
    up_components: Tensor
    down_explained: Tensor
    up_explained: Tensor
    requested_k: int
    principal_k: int
    augment: int = 0

    @property
    def k(self) -> int:
        return int(self.down_components.shape[0])

    @property
    def clamped(self) -> bool:
        return self.principal_k < self.requested_k


def layer_seed(seed: int, layer: str) -> int:
    """A per-layer seed: the same for the same (seed, layer name) on every machine."""
    return (seed * 1_000_003 + zlib.crc32(layer.encode())) % (2**63)


CUDA_EIGH_STREAMS = 4  # concurrent eigh streams for a batch of large matrices on CUDA


def batched_eigh(symmetric: Tensor) -> tuple[Tensor, Tensor]:
    """`torch.linalg.eigh` of a batch (L, d, d); on CUDA, large matrices are split over a few streams.

    cuSOLVER decomposes a batch of matrices larger than 32 x 32 one after another, each too small
    to fill the GPU; host threads, each on its own stream, let several run at once (the GIL is
    released inside the call). Same result as one call. (Giving a fixed share of the batch to the
    host's LAPACK beside the streams was tried on the H200 host: 18.1 s against 18.6 s for a
    20-file SDXL compress, within run-to-run noise, so it is not done.)
    """
    count = symmetric.shape[0] if symmetric.dim() == 3 else 1
    if not symmetric.is_cuda or count < 2 or symmetric.shape[-1] <= 32:
        return torch.linalg.eigh(symmetric)
    _load_cuda_linalg(symmetric.device)
    parts = symmetric.chunk(min(CUDA_EIGH_STREAMS, count))
    results: list = [None] * len(parts)
    caller = torch.cuda.current_stream(symmetric.device)
    streams = [torch.cuda.Stream(symmetric.device) for _ in parts]

    def decompose(index: int) -> None:
        with torch.cuda.stream(streams[index]):
            results[index] = torch.linalg.eigh(parts[index])

    for stream in streams:
        stream.wait_stream(caller)
    with ThreadPoolExecutor(len(parts)) as pool:
        list(pool.map(decompose, range(len(parts))))  # list() re-raises a worker's error here
    for stream in streams:
        caller.wait_stream(stream)
    for values, vectors in results:  # allocated on the side streams, used on the caller's
        values.record_stream(caller)
        vectors.record_stream(caller)
    return torch.cat([values for values, _ in results]), torch.cat([vectors for _, vectors in results])


@functools.cache
def _load_cuda_linalg(device: torch.device) -> None:
    """torch loads its CUDA linear-algebra library lazily, and that first load is not thread-safe:
    do it once on the calling thread before any worker thread decomposes."""
    torch.linalg.eigh(torch.eye(33, dtype=torch.float64, device=device))


def _sorted_eigh(gram: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvalues (descending, >= 0) and eigenvectors of symmetric matrices (..., d, d)."""
    energies, vectors = batched_eigh(gram)
    return energies.flip(-1).clamp_min(0.0), vectors.flip(-1)


def _kept_counts(energies: Tensor, counts: list[int] | None = None) -> list[int]:
    """Per matrix of a batch (L, m): how many eigenvalues lie above the rank tolerance, among the
    first ``counts[i]`` (default all); one host sync for the whole batch."""
    if energies.shape[-1] == 0:
        return [0] * energies.shape[0]
    top = energies[:, :1]
    above = (energies > top * RANK_TOLERANCE) & (top > 0)
    if counts is not None:
        limit = torch.tensor(counts, device=energies.device).unsqueeze(1)
        above &= torch.arange(energies.shape[-1], device=energies.device) < limit
    return above.sum(-1).tolist()


def _above_tolerance(energies: Tensor) -> int:
    return _kept_counts(energies.unsqueeze(0))[0]


def chunks(count: int, per_item: int, budget: int = BATCH_ELEMENTS) -> list[range]:
    """Consecutive ranges of ``count`` items, each holding at most ``budget`` numbers (>= 1 item)."""
    step = max(1, budget // max(per_item, 1))
    return [range(start, min(start + step, count)) for start in range(0, count, step)]


def directions_from_rows(rows: Tensor) -> Directions:
    """Principal directions of the rows of ``rows`` (M, d), through the smaller Gram matrix."""
    return directions_batch(rows.unsqueeze(0))[0]


def directions_batch(rows: Tensor) -> list[Directions]:
    """`directions_from_rows` of a stack of equal-shape row sets (L, M, d): one batched eigh."""
    rows64 = rows.double()
    count, dim = rows64.shape[-2:]
    if count > dim:
        return directions_from_covariances(rows64.mT @ rows64, [count] * rows64.shape[0])
    return directions_from_grams(rows64, rows64 @ rows64.mT)


def directions_from_grams(rows64: Tensor, grams: Tensor, limit: int | None = None) -> list[Directions]:
    """Directions of row sets (L, M, d) from their Gram matrices (L, M, M) = rows @ rows^T:
    eigenvectors E of the Gram give the directions rows^T E / sqrt(lambda) (one batched eigh).
    Only the leading ``limit`` directions are formed (each column is computed on its own, so
    they are the same numbers as without a limit); every energy and the kept count stay."""
    count = rows64.shape[-2]
    energies, mixing = _sorted_eigh(grams)  # (L, M, M)
    kept = _kept_counts(energies)
    widest = _widest(kept, limit)
    roots = energies[:, :widest].clamp_min(torch.finfo(torch.float64).tiny).sqrt()
    vectors, _ = fix_signs((rows64.mT @ mixing[:, :, :widest]) / roots.unsqueeze(1), dim=0)  # (L, d, widest)
    return [Directions(vectors[i, :, : min(kept[i], widest)], energies[i], count, kept[i]) for i in range(len(kept))]


def _widest(kept: list[int], limit: int | None) -> int:
    widest = max(kept, default=0)
    return widest if limit is None else min(widest, limit)


def directions_from_covariance(covariance: Tensor, count: int) -> Directions:
    """Principal directions from a summed outer-product matrix (d, d) of ``count`` vectors."""
    return directions_from_covariances(covariance.unsqueeze(0), [count])[0]


def directions_from_covariances(covariances: Tensor, counts: list[int], limit: int | None = None) -> list[Directions]:
    """`directions_from_covariance` of a stack (L, d, d): one batched eigh (the leading ``limit``
    directions kept, as in `directions_from_grams`)."""
    energies, vectors = _sorted_eigh(covariances.double())
    kept = _kept_counts(energies, counts)
    energies = [energies[i, : min(c, energies.shape[-1])] for i, c in enumerate(counts)]
    widest = _widest(kept, limit)
    vectors, _ = fix_signs(vectors[:, :, :widest], dim=0)
    return [Directions(vectors[i, :, : min(kept[i], widest)], energies[i], counts[i], kept[i]) for i in range(len(counts))]


def explained_curve(energies: Tensor) -> Tensor:
    """Cumulative explained-energy fraction of the first 1, 2, ... components (float32), kept up to
    `MAX_CURVE` components; the fractions are of the energy of ALL components, so a kept curve
    that stops short of the last component ends below 1. Non-decreasing by construction
    (descending, clamped non-negative energies), capped at 1 against rounding."""
    energies = energies.double().clamp_min(0.0)
    total = energies.sum() if energies.numel() else energies.new_zeros(())
    if total <= 0:
        return torch.zeros(min(energies.numel(), MAX_CURVE), dtype=torch.float32)
    return (energies[:MAX_CURVE].cumsum(0) / total).clamp_max(1.0).float()


def components_for_energy(energies: Tensor, energy: float) -> int:
    """Smallest K whose cumulative explained energy reaches ``energy``."""
    total = energies.double().sum()
    if total <= 0:
        return 0
    fractions = energies.double().cumsum(0) / total
    reached = (fractions >= energy - 1e-12).nonzero()
    return int(reached[0]) + 1 if reached.numel() else int(energies.numel())


def orthonormal_complement(basis: Tensor, count: int, generator: torch.Generator) -> Tensor:
    """``count`` seeded random unit vectors (d, count), orthogonal to ``basis`` and each other."""
    dim = basis.shape[0]
    if count == 0:
        return basis.new_zeros(dim, 0)
    draws = torch.randn(dim, count, generator=generator, dtype=torch.float64).to(basis.device)
    for _ in range(2):  # twice is enough for orthogonality to rounding level
        draws = draws - basis @ (basis.T @ draws)
    draws, _ = torch.linalg.qr(draws)
    draws, _ = fix_signs(draws, dim=0)
    return draws


def _choose_k(down: Directions, up: Directions, spec: SubspaceSpec, in_features: int, out_features: int) -> tuple[int, int]:
    if spec.k is not None:
        requested = spec.k
    else:
        requested = max(components_for_energy(down.energies, spec.energy), components_for_energy(up.energies, spec.energy))
    spanned = max(down.rank, up.rank)
    return requested, min(requested, spanned, in_features, out_features)


def build_subspace(down: Directions, up: Directions, spec: SubspaceSpec, seed: int, in_features: int, out_features: int) -> LayerSubspace:
    """Components of one layer from the down and up directions, completed and augmented."""
    requested, k = _choose_k(down, up, spec, in_features, out_features)
    augment = max(0, min(spec.augment, min(in_features, out_features) - k))
    generator = torch.Generator().manual_seed(seed)
    sides = []
    for directions in (down, up):
        principal = directions.vectors[:, :k]
        principal = torch.cat([principal, orthonormal_complement(principal, k - principal.shape[1], generator)], dim=1)
        sides.append(torch.cat([principal, orthonormal_complement(principal, augment, generator)], dim=1))
    return LayerSubspace(
        down_components=sides[0].T.float().contiguous(),
        up_components=sides[1].float().contiguous(),
        down_explained=explained_curve(down.energies),
        up_explained=explained_curve(up.energies),
        requested_k=requested,
        principal_k=k,
        augment=augment,
    )


def warn_clamped(layers: dict[str, LayerSubspace], augment: int = 0) -> None:
    """One `SubspaceWarning` naming how many layers had K (or P) clamped, and a few of them."""
    clamped = {name: s for name, s in layers.items() if s.clamped}
    if clamped:
        examples = ", ".join(f"{n}: {s.requested_k} -> {s.principal_k}" for n, s in list(clamped.items())[:3])
        warnings.warn(
            f"K clamped in {len(clamped)} of {len(layers)} layers to the number of directions the collection "
            f"spans (or the layer's size), e.g. {examples}",
            SubspaceWarning,
            stacklevel=3,
        )
    short = [n for n, s in layers.items() if s.augment < augment]
    if short:
        warnings.warn(f"augment P clamped in {len(short)} layers to fit the layer size, e.g. {short[0]}", SubspaceWarning, stacklevel=3)


def extract(downs: list[Tensor], ups: list[Tensor], spec: SubspaceSpec, seed: int | None = None, warn: bool = True) -> LayerSubspace:
    """EigenLoRAx components of one layer from canonical factors (downs (r_i, in), ups (out, r_i)).

    Ranks may differ between adapters. ``seed`` (default ``spec.seed``; collections pass
    `layer_seed`) drives completion and augmentation. K larger than the collection spans is clamped with a `SubspaceWarning`.
    """
    if not downs or len(downs) != len(ups):
        raise ValueError(f"extract needs as many downs as ups (>= 1), got {len(downs)} and {len(ups)}")
    down_rows = torch.cat([d.reshape(d.shape[0], -1) for d in downs])
    up_rows = torch.cat([u.reshape(u.shape[0], -1).T for u in ups])
    subspace = build_subspace(
        directions_from_rows(down_rows), directions_from_rows(up_rows), spec, spec.seed if seed is None else seed,
        down_rows.shape[1], up_rows.shape[1],
    )
    if warn:
        warn_clamped({"layer": subspace}, spec.augment)
    return subspace


def _reference_directions(vectors: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The official EigenLoRAx procedure: vectors as columns (d, M), mean column subtracted,
    d x d covariance, general (non-symmetric) eig, real parts sorted by eigenvalue."""
    columns = vectors.float()
    centred = columns - columns.mean(dim=1, keepdim=True)
    covariance = centred @ centred.T
    eigenvalues, eigenvectors = torch.linalg.eig(covariance)
    eigenvalues, eigenvectors = eigenvalues.real, eigenvectors.real
    order = eigenvalues.argsort(descending=True)
    top, _ = torch.linalg.qr(eigenvectors[:, order[:k]].double())  # orthonormal, so errors are exact projections
    top, _ = fix_signs(top, dim=0)
    return top.float(), eigenvalues[order].clamp_min(0).double()


def reference_extract(downs: list[Tensor], ups: list[Tensor], k: int) -> LayerSubspace:
    """Baseline: the reference code's centred PCA, reconstructed WITHOUT the mean.

    Its components miss the mean direction, so a collection with a non-zero mean is
    reconstructed worse than by `extract` at the same K. No canonical form, no augmentation.
    """
    down_columns = torch.cat([d.reshape(d.shape[0], -1) for d in downs]).T  # (in, M)
    up_columns = torch.cat([u.reshape(u.shape[0], -1) for u in ups], dim=1)  # (out, M)
    k = min(k, down_columns.shape[0], up_columns.shape[0])
    down, down_energies = _reference_directions(down_columns, k)
    up, up_energies = _reference_directions(up_columns, k)
    return LayerSubspace(down.T.contiguous(), up.contiguous(), explained_curve(down_energies), explained_curve(up_energies), k, k)
