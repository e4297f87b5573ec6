"""LyCORIS variants: shape algebra, dW per layer (LoHa, LoKr, LoCon-Tucker), truncation to LoRA.

The math follows LyCORIS's own functional code (``lycoris/functional/loha.py`` ``diff_weight``,
``lycoris/functional/lokr.py`` ``make_kron`` / ``diff_weight``) and kohya's alpha rule:

- LoHa: dW = (w1_a @ w1_b) * (w2_a @ w2_b) * alpha / r, r = w1_b's rows.
- LoKr: dW = kron(w1, w2) * alpha / r, where r is the rank of w1's factors when w1 is low-rank
  (``lokr_w1_a``), else of w2's (``lokr_w2_a``); when both are full there is no r and the
  scale is 1. A 4-D w2 (conv) gets w1 unsqueezed to 4-D first (``make_kron``).
- alpha missing or 0 means alpha = r (scale 1), as kohya's and LyCORIS's modules do.

Every shape is checked (``dense_shape``) before anything is multiplied, so a small file whose
factor shapes promise a huge dW is refused instead of allocated; ``materialise`` keeps dW in
factored form only while the inner dimension is smaller than the dense matrix would be.

DoRA (``dora_scale``) and the other weight-decomposed or orthogonal variants are refused with a
message naming the variant: they are not a low-rank additive update of W alone.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from studio.errors import FormatError, UnsupportedVariantError

REFUSED = {
    "dora_scale": "DoRA (weight-decomposed LoRA: rescales W by a learned magnitude, not an additive dW)",
    "w_norm": "LyCORIS norm fine-tune (changes normalisation weights, not a linear dW)",
    "oft_blocks": "OFT (orthogonal fine-tuning: multiplies W by a rotation, not an additive dW)",
    "oft_diag": "OFT (orthogonal fine-tuning: multiplies W by a rotation, not an additive dW)",
    "diff": "LyCORIS full (stores a dense dW; convert it with a LyCORIS tool to a LoRA first)",
}
MAX_DENSE_ELEMENTS = 2**26  # 64 M elements (256 MB fp32): larger than any SD / SDXL weight

Factors = tuple[Tensor, Tensor]  # (left, right) with dW = left @ right, both 2-D


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


def effective_alpha(alpha: float | None, rank: int) -> float:
    """kohya / LyCORIS: a missing or zero alpha means alpha = rank (scale 1)."""
    return float(rank) if alpha is None or alpha == 0 else float(alpha)


def _alpha(parts: dict[str, Tensor]) -> float | None:
    value = parts.get("alpha")
    if value is None:
        return None
    if value.numel() != 1:
        raise FormatError(f"alpha has shape {tuple(value.shape)}, expected a scalar")
    return float(value.double())


def _need(parts: dict[str, Tensor], name: str, dims: tuple[int, ...]) -> Tensor:
    """A factor that must be there, floating, with one of the given numbers of dimensions."""
    if name not in parts:
        raise FormatError(f"lacks tensor {name!r}")
    tensor = parts[name]
    if not tensor.is_floating_point():
        raise FormatError(f"{name} has dtype {tensor.dtype}, expected a floating-point tensor")
    if tensor.dim() not in dims:
        raise FormatError(f"{name} has shape {tuple(tensor.shape)}: expected {' or '.join(f'{d}-D' for d in dims)}")
    if tensor.numel() == 0:
        raise FormatError(f"{name} has shape {tuple(tensor.shape)}: empty (rank 0?)")
    return tensor


def _flat(shape: torch.Size) -> int:
    return int(math.prod(shape))


def _loha_shape(parts: dict[str, Tensor]) -> tuple[int, int]:
    if "hada_t1" in parts or "hada_t2" in parts:
        raise UnsupportedVariantError("LoHa with Tucker cores (hada_t1/hada_t2) is not converted")
    w1_a, w1_b = _need(parts, "hada_w1_a", (2,)), _need(parts, "hada_w1_b", (2, 4))
    w2_a, w2_b = _need(parts, "hada_w2_a", (2,)), _need(parts, "hada_w2_b", (2, 4))
    if w1_a.shape[1] != w1_b.shape[0] or w2_a.shape[1] != w2_b.shape[0]:
        raise FormatError(f"LoHa ranks do not fit: w1 {tuple(w1_a.shape)} x {tuple(w1_b.shape)}, w2 {tuple(w2_a.shape)} x {tuple(w2_b.shape)}")
    first = (int(w1_a.shape[0]), _flat(w1_b.shape[1:]))
    second = (int(w2_a.shape[0]), _flat(w2_b.shape[1:]))
    if first != second:
        raise FormatError(f"LoHa halves have different shapes: w1 gives {first}, w2 gives {second}")
    return first


def _lokr_half(parts: dict[str, Tensor], which: str) -> tuple[int, int]:
    """(rows, flat columns) of one Kronecker factor, checked."""
    if f"lokr_{which}" in parts:
        full = _need(parts, f"lokr_{which}", (2,) if which == "w1" else (2, 4))
        return int(full.shape[0]), _flat(full.shape[1:])
    if which == "w2" and "lokr_t2" in parts:
        raise UnsupportedVariantError("LoKr with a Tucker core (lokr_t2) is not converted")
    a = _need(parts, f"lokr_{which}_a", (2,))
    b = _need(parts, f"lokr_{which}_b", (2,) if which == "w1" else (2, 4))
    if a.shape[1] != b.shape[0]:
        raise FormatError(f"LoKr {which} factors do not fit: {tuple(a.shape)} x {tuple(b.shape)}")
    return int(a.shape[0]), _flat(b.shape[1:])


def _lokr_shape(parts: dict[str, Tensor]) -> tuple[int, int]:
    (a, b), (c, d) = _lokr_half(parts, "w1"), _lokr_half(parts, "w2")
    return a * c, b * d


def _tucker_shape(parts: dict[str, Tensor]) -> tuple[int, int]:
    up, mid, down = _need(parts, "up", (2, 4)), _need(parts, "mid", (4,)), _need(parts, "down", (2, 4))
    rank = int(down.shape[0])
    if up.dim() == 4 and tuple(up.shape[2:]) != (1, 1) or down.dim() == 4 and tuple(down.shape[2:]) != (1, 1):
        raise FormatError(f"Tucker LoCon up {tuple(up.shape)} / down {tuple(down.shape)} must be 1x1")
    if up.shape[1] != mid.shape[0] or mid.shape[1] != rank:
        raise FormatError(f"Tucker LoCon factors do not fit: up {tuple(up.shape)}, mid {tuple(mid.shape)}, down {tuple(down.shape)}")
    return int(up.shape[0]), int(down.shape[1]) * _flat(mid.shape[2:])


def dense_shape(variant: str, parts: dict[str, Tensor]) -> tuple[int, int]:
    """(out, in_flat) of the dW a LyCORIS layer stands for, from shapes alone (nothing multiplied)."""
    shape = {"loha": _loha_shape, "lokr": _lokr_shape, "tucker": _tucker_shape}[variant](parts)
    if shape[0] * shape[1] > MAX_DENSE_ELEMENTS:
        raise FormatError(f"factor shapes give a dW of {shape[0]} x {shape[1]}, over the cap of {MAX_DENSE_ELEMENTS} elements")
    return shape


def _rowwise_kron(a: Tensor, b: Tensor) -> Tensor:
    """Row i of the result is kron(a[i], b[i]) (the face-splitting product)."""
    return (a[:, :, None] * b[:, None, :]).flatten(1)


def loha_factors(parts: dict[str, Tensor]) -> Factors:
    """LoHa dW as factors of inner size r1*r2, or ``(dW, None)`` when the dense dW is smaller."""
    out, inp = _loha_shape(parts)
    w1_a, w1_b = parts["hada_w1_a"].double(), parts["hada_w1_b"].double().flatten(1)
    w2_a, w2_b = parts["hada_w2_a"].double(), parts["hada_w2_b"].double().flatten(1)
    rank = int(w1_b.shape[0])
    scale = effective_alpha(_alpha(parts), rank) / rank
    if w1_b.shape[0] * w2_b.shape[0] < min(out, inp):
        return _rowwise_kron(w1_a, w2_a) * scale, _rowwise_kron(w1_b.T, w2_b.T).T
    return ((w1_a @ w1_b) * (w2_a @ w2_b)) * scale, None


def _lokr_scale(parts: dict[str, Tensor]) -> float:
    """LyCORIS ``diff_weight``: r from w1_a when w1 is low-rank, else from w2_a; none -> scale 1."""
    if "lokr_w1_a" in parts:
        rank = int(parts["lokr_w1_a"].shape[1])
    elif "lokr_w2_a" in parts:
        rank = int(parts["lokr_w2_a"].shape[1])
    else:
        return 1.0
    return effective_alpha(_alpha(parts), rank) / rank


def _lokr_pair(parts: dict[str, Tensor], which: str) -> tuple[Tensor, Tensor]:
    """(left, right) of one Kronecker half; a full w is w @ I or I @ w, whichever inner side is smaller."""
    if f"lokr_{which}" in parts:
        full = parts[f"lokr_{which}"].double().flatten(1)
        rows, cols = full.shape
        return (full, torch.eye(cols, dtype=full.dtype)) if cols <= rows else (torch.eye(rows, dtype=full.dtype), full)
    return parts[f"lokr_{which}_a"].double(), parts[f"lokr_{which}_b"].double().flatten(1)


def lokr_factors(parts: dict[str, Tensor]) -> Factors:
    """LoKr: dW = kron(w1, w2) * scale, flattened 2-D (out, in * kh * kw).

    kron(L1 R1, L2 R2) = kron(L1, L2) kron(R1, R2) keeps dW factored while the inner size is
    smaller than the dense dW's (a full half is w @ I or I @ w); a 4-D w2 stays in the right-hand columns, which matches LyCORIS's ``make_kron``
    (w1 unsqueezed to (a, b, 1, 1)): flattening kron(w1, w2) gives kron(w1, w2.flatten(1)).
    """
    out, inp = _lokr_shape(parts)
    scale = _lokr_scale(parts)
    (l1, r1), (l2, r2) = _lokr_pair(parts, "w1"), _lokr_pair(parts, "w2")
    if l1.shape[1] * l2.shape[1] < min(out, inp):
        return torch.kron(l1, l2) * scale, torch.kron(r1, r2)
    return torch.kron(l1 @ r1, l2 @ r2) * scale, None


def tucker_factors(parts: dict[str, Tensor]) -> Factors:
    """LoCon with a Tucker core: up (out, r, 1, 1), mid (r, r, kh, kw), down (r, in, 1, 1)."""
    _tucker_shape(parts)
    up, mid, down = parts["up"].double().flatten(1), parts["mid"].double(), parts["down"].double().flatten(1)
    rank = int(down.shape[0])
    right = torch.einsum("rskl,si->rikl", mid, down).flatten(1)
    return up * (effective_alpha(_alpha(parts), rank) / rank), right


def materialise(variant: str, parts: dict[str, Tensor]) -> Factors:
    """dW of one non-plain layer as ``(left, right)`` with dW = left @ right, or ``(dW, None)``.

    Shapes are checked first; the result never holds more than about the dense dW's elements.
    """
    dense_shape(variant, parts)
    return {"loha": loha_factors, "lokr": lokr_factors, "tucker": tucker_factors}[variant](parts)


def spectrum(factors: Factors) -> tuple[Tensor, Tensor, Tensor]:
    """SVD ``(u, s, vh)`` of dW = left @ right (or of the dense dW), in float64.

    Thin QR of both factors reduces the SVD to the small inner matrix (Eckart-Young still holds).
    """
    left, right = factors
    if right is None:
        return torch.linalg.svd(left.double(), full_matrices=False)
    q_left, r_left = torch.linalg.qr(left.double())
    q_right, r_right = torch.linalg.qr(right.double().T)
    u_small, s, vh_small = torch.linalg.svd(r_left @ r_right.T, full_matrices=False)
    return q_left @ u_small, s, vh_small @ q_right.T


def rank_for(s: Tensor, target: float, cap: int) -> int:
    """Smallest rank whose truncation error ||dW - dW_r|| / ||dW|| is at most ``target`` (<= cap)."""
    energy = s.double().square()
    total = float(energy.sum())
    if total == 0:
        return 1
    tail = (energy.flip(0).cumsum(0).flip(0) / total).sqrt()  # tail[r] = error of keeping r values
    for rank in range(1, min(cap, int(s.numel())) + 1):
        if rank >= s.numel() or float(tail[rank]) <= target:
            return rank
    return max(1, min(cap, int(s.numel())))


def truncate(factors: Factors, rank: int | None = None, target: float = 0.01, cap: int = 256) -> tuple[Tensor, Tensor, float]:
    """Best LoRA factors (down, up; alpha = rank) of dW and the relative error of the truncation.

    ``rank`` fixes the rank; ``None`` picks the smallest rank reaching ``target`` (at most ``cap``).
    """
    u, s, vh = spectrum(factors)
    keep = rank_for(s, target, cap) if rank is None else max(1, min(rank, int(s.numel())))
    root = s[:keep].sqrt()
    down = (root[:, None] * vh[:keep]).float()
    up = (u[:, :keep] * root[None, :]).float()
    total = float(s.square().sum())
    error = (float(s[keep:].square().sum()) / total) ** 0.5 if total > 0 else 0.0
    return down, up, error
