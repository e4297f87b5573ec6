"""LyCORIS variants: materialise dW per layer (LoHa, LoKr, LoCon-Tucker) and truncate to LoRA.

DoRA (``dora_scale``) and the other weight-decomposed or orthogonal variants are refused with a
message naming the variant: they are not a low-rank additive update of W alone.
"""

from __future__ import annotations

import torch
from torch import Tensor

from studio.errors import UnsupportedVariantError

REFUSED = {
    "dora_scale": "DoRA (weight-decomposed LoRA: rescales W by a learned magnitude, not an additive dW)",
    "w_norm": "LyCORIS norm fine-tune (changes normalisation weights, not a linear dW)",
    "oft_blocks": "OFT (orthogonal fine-tuning: multiplies W by a rotation, not an additive dW)",
    "oft_diag": "OFT (orthogonal fine-tuning: multiplies W by a rotation, not an additive dW)",
    "diff": "LyCORIS full (stores a dense dW; convert it with a LyCORIS tool to a LoRA first)",
}


def variant_of(parts: set[str]) -> str:
    """Name the variant of one layer from its part names."""
    for part, description in REFUSED.items():
        if part in parts:
            return f"refused:{description}"
    if any(p.startswith("hada_") for p in parts):
        return "loha"
    if any(p.startswith("lokr_") for p in parts):
        return "lokr"
    if "mid" in parts:
        return "tucker"
    return "lora"


def _scale(alpha: Tensor | None, rank: int) -> float:
    return 1.0 if alpha is None else float(alpha) / rank


Factors = tuple[Tensor, Tensor]  # (left, right) with dW = left @ right, both 2-D


def _rowwise_kron(a: Tensor, b: Tensor) -> Tensor:
    """Row i of the result is kron(a[i], b[i]) (the face-splitting product)."""
    return (a[:, :, None] * b[:, None, :]).flatten(1)


def loha_factors(parts: dict[str, Tensor]) -> Factors:
    """LoHa: dW = (w1_a w1_b) * (w2_a w2_b) * alpha / r, as a product of rank r1*r2 factors."""
    if "hada_t1" in parts or "hada_t2" in parts:
        raise UnsupportedVariantError("LoHa with Tucker cores (hada_t1/hada_t2) is not converted")
    w1_a, w1_b = parts["hada_w1_a"].float(), parts["hada_w1_b"].float().flatten(1)
    w2_a, w2_b = parts["hada_w2_a"].float(), parts["hada_w2_b"].float().flatten(1)
    scale = _scale(parts.get("alpha"), w1_b.shape[0])
    return _rowwise_kron(w1_a, w2_a) * scale, _rowwise_kron(w1_b.T, w2_b.T).T


def _lokr_factor(parts: dict[str, Tensor], which: str) -> tuple[Tensor, Tensor, int | None]:
    """(left, right, rank) of one Kronecker factor; a full factor is (w, identity, None)."""
    if f"lokr_{which}" in parts:
        full = parts[f"lokr_{which}"].float()
        return full, torch.eye(full[0].numel()), None
    if "lokr_t2" in parts and which == "w2":
        raise UnsupportedVariantError("LoKr with a Tucker core (lokr_t2) is not converted")
    a, b = parts[f"lokr_{which}_a"].float(), parts[f"lokr_{which}_b"].float()
    return a, b.flatten(1), a.shape[1]


def lokr_factors(parts: dict[str, Tensor]) -> Factors:
    """LoKr: dW = kron(w1, w2) * alpha / r (r of the low-rank factor), flattened 2-D.

    kron(L1 R1, L2 R2) = kron(L1, L2) kron(R1, R2): the product of two small factors.
    Conv kernels (4-D w2) stay in w2's right factor, so flattening matches (out, in*kh*kw).
    """
    left1, right1, rank1 = _lokr_factor(parts, "w1")
    left2, right2, rank2 = _lokr_factor(parts, "w2")
    if left1.dim() != 2 or left2.dim() != 2:
        dense = torch.kron(left1 @ right1, (left2.flatten(1) @ right2))
        return dense, torch.eye(dense.shape[1])
    rank = rank2 or rank1
    scale = _scale(parts.get("alpha"), rank) if rank else 1.0
    return torch.kron(left1, left2) * scale, torch.kron(right1, right2)


def tucker_factors(parts: dict[str, Tensor]) -> Factors:
    """LoCon with a Tucker core: up (out, r, 1, 1), mid (r, r, kh, kw), down (r, in, 1, 1)."""
    up, mid, down = parts["up"].float().flatten(1), parts["mid"].float(), parts["down"].float().flatten(1)
    right = torch.einsum("rskl,si->rikl", mid, down).flatten(1)
    return up * _scale(parts.get("alpha"), down.shape[0]), right


def materialise(variant: str, parts: dict[str, Tensor]) -> Factors:
    """dW of one layer of a non-plain variant, as factors (left, right) with dW = left @ right."""
    return {"loha": loha_factors, "lokr": lokr_factors, "tucker": tucker_factors}[variant](parts)


def truncate(factors: Factors, rank: int) -> tuple[Tensor, Tensor, float]:
    """Best rank-``rank`` LoRA factors of dW = left @ right (down, up; alpha = rank) and the relative error.

    Thin QR of both factors reduces the SVD to the small inner matrix (Eckart-Young still holds).
    """
    left, right = (f.float() for f in factors)
    q_left, r_left = torch.linalg.qr(left)
    q_right, r_right = torch.linalg.qr(right.T)
    u_small, s, vh_small = torch.linalg.svd(r_left @ r_right.T, full_matrices=False)
    u, vh = q_left @ u_small, vh_small @ q_right.T
    rank = min(rank, int(s.numel()))
    root = s[:rank].sqrt()
    down = (root[:, None] * vh[:rank]).float()
    up = (u[:, :rank] * root[None, :]).float()
    total = float(s.square().sum())
    error = (float(s[rank:].square().sum()) / total) ** 0.5 if total > 0 else 0.0
    return down, up, error
