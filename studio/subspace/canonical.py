"""Canonical ("balanced") form of a LoRA layer, and the sign convention for singular vectors.

A LoRA factorisation is not unique: (B M)(M^-1 A) gives the same dW for any invertible M.
Bringing every layer to dW = U S V^T, B = U S^1/2, A = S^1/2 V^T before stacking makes the
subspace statistics depend on dW only: A^T A = V S V^T = (dW^T dW)^1/2 and B B^T = U S U^T.
The SVD is computed from two r x r Gram eigendecompositions and an r x r SVD (`canonical_batch`);
dW (out x in) is never formed.
"""

from __future__ import annotations

import torch
from torch import Tensor


def fix_signs(vectors: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """Flip each vector so that its entry of largest magnitude is positive.

    ``dim`` is the axis of the (last two, matrix) axes along which a vector runs (0: columns are
    vectors, 1: rows are vectors); leading axes are a batch. Returns the flipped vectors and the
    +-1 signs applied (batch shape + (count,)), so a paired factor can be flipped too.
    Ties between equal magnitudes go to the first index, so the result is deterministic.
    """
    axis = vectors.dim() - 2 + dim
    if vectors.numel() == 0:
        shape = vectors.shape[:-2] + (vectors.shape[-1 - dim],)
        return vectors, torch.ones(shape, dtype=vectors.dtype, device=vectors.device)
    index = vectors.abs().argmax(dim=axis, keepdim=True)
    signs = torch.sign(vectors.gather(axis, index)).squeeze(axis)
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return vectors * (signs.unsqueeze(axis)), signs


def canonical(down: Tensor, up: Tensor, scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """Balanced factors ``(A, B)`` of ``dW = scale * up @ down``: B = U S^1/2, A = S^1/2 V^T.

    ``down`` is (r, in), ``up`` is (out, r). The rank r is kept: when dW has rank p < r (or
    r > min(in, out)) the trailing rows of A / columns of B are zero. Computed in float64 on the
    tensors' device, returned as float32. Singular vector signs follow `fix_signs` on U.
    """
    if down.dim() != 2 or up.dim() != 2 or down.shape[0] != up.shape[1]:
        raise ValueError(f"canonical needs down (r, in) and up (out, r), got {tuple(down.shape)} and {tuple(up.shape)}")
    new_down, new_up = canonical_batch(down.unsqueeze(0), up.unsqueeze(0), scale)
    return new_down[0], new_up[0]


GRAM_TOL = 1e-12  # Gram eigenvalues below this fraction of the largest count as zero (factor directions < 1e-6)


def _gram_basis(factor: Tensor) -> tuple[Tensor, Tensor]:
    """``factor`` (G, n, r) = Q R with Q = factor @ P orthonormal: returns P and R, both (G, r, r).

    From the eigendecomposition E diag(lam) E^T of the Gram matrix factor^T factor: R = diag(lam^1/2) E^T,
    P = E diag(lam^-1/2). Directions with lam <= GRAM_TOL * max(lam) get 0 in both (zero columns of Q).
    """
    lam, vecs = torch.linalg.eigh(factor.mT @ factor)
    keep = lam > GRAM_TOL * lam[..., -1:]
    root = lam.clamp_min(0).sqrt()
    inverse = torch.where(keep, 1 / root, torch.zeros_like(root))
    return vecs * inverse.unsqueeze(-2), (root * keep).unsqueeze(-1) * vecs.mT


def canonical_batch(downs: Tensor, ups: Tensor, scale: float | Tensor = 1.0) -> tuple[Tensor, Tensor]:
    """`canonical` of a batch of layers of one shape: downs (G, r, in), ups (G, out, r), any float
    dtype; ``scale`` is one number or one per layer (G,).

    dW = Q_up (R_up R_down^T) Q_down^T with Q_up R_up = up, Q_down R_down = down^T, and the r x r middle
    is SVD'd. The R factors come from eigh of the r x r Gram matrices (`_gram_basis`), not from thin QRs:
    on CUDA torch runs batched QR of tall (G, n, r) matrices as one cuSOLVER call per matrix, while
    batched eigh / SVD of small (r <= 32) matrices are truly batched Jacobi kernels, and the Grams and
    Q @ (...) products are bmm. Float64 keeps the squared condition number harmless for factors whose
    singular values span up to ~1e6; directions of a factor below 1e-6 of its largest singular value
    count as zero (a worst-case relative change of ~1e-6 in dW when one factor holds all the
    conditioning; float32 output carries ~1e-7). Same semantics as `canonical` layer by layer.
    """
    if downs.dim() != 3 or ups.dim() != 3 or downs.shape[1] != ups.shape[2] or downs.shape[0] != ups.shape[0]:
        raise ValueError(f"canonical_batch needs downs (G, r, in) and ups (G, out, r), got {tuple(downs.shape)} and {tuple(ups.shape)}")
    new_down, new_up = _balanced(downs, ups, scale)
    return new_down.float(), new_up.float()


def _balanced(downs: Tensor, ups: Tensor, scale: float | Tensor) -> tuple[Tensor, Tensor]:
    """`canonical_batch` before the cast to float32 (float64 factors)."""
    if isinstance(scale, Tensor):
        scale = scale.to(device=ups.device, dtype=torch.float64).reshape(-1, 1, 1)
    up, down = ups.double() * scale, downs.double()
    p_up, r_up = _gram_basis(up)  # Q_up = up @ p_up
    p_down, r_down = _gram_basis(down.mT)  # Q_down = down^T @ p_down
    u, s, vh = torch.linalg.svd(r_up @ r_down.mT)  # (G, r, r) each; rank-deficient directions get s = 0
    left, signs = fix_signs(up @ (p_up @ u), dim=0)  # Q_up u: (G, out, r)
    right = ((vh @ p_down.mT) @ down) * signs.unsqueeze(-1)  # vh Q_down^T: (G, r, in)
    root = s.sqrt()
    return root.unsqueeze(-1) * right, left * root.unsqueeze(-2)
