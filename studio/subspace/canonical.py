"""Canonical ("balanced") form of a LoRA layer, and the sign convention for singular vectors.

A LoRA factorisation is not unique: (B M)(M^-1 A) gives the same dW for any invertible M.
Bringing every layer to dW = U S V^T, B = U S^1/2, A = S^1/2 V^T before stacking makes the
subspace statistics depend on dW only: A^T A = V S V^T = (dW^T dW)^1/2 and B B^T = U S U^T.
The SVD is computed from two thin QRs and an r x r SVD; dW (out x in) is never formed.
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


def canonical_batch(downs: Tensor, ups: Tensor, scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """`canonical` of a batch of layers of one shape: downs (G, r, in), ups (G, out, r).

    One batched QR per side and one batched r x r SVD for the whole batch (a handful of kernel
    launches instead of ~60 per layer on a GPU). Same semantics as `canonical` layer by layer.
    """
    if downs.dim() != 3 or ups.dim() != 3 or downs.shape[1] != ups.shape[2] or downs.shape[0] != ups.shape[0]:
        raise ValueError(f"canonical_batch needs downs (G, r, in) and ups (G, out, r), got {tuple(downs.shape)} and {tuple(ups.shape)}")
    rank = downs.shape[1]
    q_up, r_up = torch.linalg.qr(ups.double() * scale)  # (G, out, p_up), (G, p_up, r)
    q_down, r_down = torch.linalg.qr(downs.double().mT)  # (G, in, p_down), (G, p_down, r)
    u, s, vh = torch.linalg.svd(r_up @ r_down.mT, full_matrices=False)  # dW = q_up (r_up r_down^T) q_down^T
    left, signs = fix_signs(q_up @ u, dim=0)  # (G, out, p)
    right = (vh @ q_down.mT) * signs.unsqueeze(-1)  # (G, p, in)
    root = s.sqrt()
    new_up, new_down = left * root.unsqueeze(-2), root.unsqueeze(-1) * right
    missing = rank - new_down.shape[1]
    if missing > 0:
        new_down = torch.cat([new_down, new_down.new_zeros(new_down.shape[0], missing, new_down.shape[2])], dim=1)
        new_up = torch.cat([new_up, new_up.new_zeros(new_up.shape[0], new_up.shape[1], missing)], dim=2)
    return new_down.float(), new_up.float()
