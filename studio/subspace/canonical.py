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

    ``dim`` is the axis along which a vector runs (0: columns are vectors, 1: rows are vectors).
    Returns the flipped vectors and the +-1 signs applied, so a paired factor can be flipped too.
    Ties between equal magnitudes go to the first index, so the result is deterministic.
    """
    if vectors.numel() == 0:
        count = vectors.shape[1 - dim]
        return vectors, torch.ones(count, dtype=vectors.dtype, device=vectors.device)
    index = vectors.abs().argmax(dim=dim, keepdim=True)
    signs = torch.sign(vectors.gather(dim, index)).squeeze(dim)
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return vectors * (signs.unsqueeze(dim)), signs


def canonical(down: Tensor, up: Tensor, scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """Balanced factors ``(A, B)`` of ``dW = scale * up @ down``: B = U S^1/2, A = S^1/2 V^T.

    ``down`` is (r, in), ``up`` is (out, r). The rank r is kept: when dW has rank p < r (or
    r > min(in, out)) the trailing rows of A / columns of B are zero. Computed in float64 on the
    tensors' device, returned as float32. Singular vector signs follow `fix_signs` on U.
    """
    if down.dim() != 2 or up.dim() != 2 or down.shape[0] != up.shape[1]:
        raise ValueError(f"canonical needs down (r, in) and up (out, r), got {tuple(down.shape)} and {tuple(up.shape)}")
    rank = down.shape[0]
    down64 = down.double()
    up64 = up.double() * scale
    q_up, r_up = torch.linalg.qr(up64)  # (out, p_up), (p_up, r)
    q_down, r_down = torch.linalg.qr(down64.T)  # (in, p_down), (p_down, r)
    small = r_up @ r_down.T  # (p_up, p_down): dW = q_up small q_down^T
    u, s, vh = torch.linalg.svd(small, full_matrices=False)
    left = q_up @ u  # (out, p)
    right = vh @ q_down.T  # (p, in)
    left, signs = fix_signs(left, dim=0)
    right = right * signs.unsqueeze(1)
    root = s.sqrt()
    new_up = left * root
    new_down = root.unsqueeze(1) * right
    kept = new_down.shape[0]
    if kept < rank:
        new_down = torch.cat([new_down, new_down.new_zeros(rank - kept, new_down.shape[1])])
        new_up = torch.cat([new_up, new_up.new_zeros(new_up.shape[0], rank - kept)], dim=1)
    return new_down.float(), new_up.float()
