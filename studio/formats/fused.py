"""Fused projections: one LoRA on a fused weight (FLUX ``img_attn.qkv``, ``linear1``; SD3 ``attn.qkv``)
<-> one LoRA per diffusers module, exactly.

A fused weight stacks its pieces' rows: ``W = [W_q; W_k; W_v(; W_mlp)]``, so a LoRA
``dW = s * up @ down`` on it is, row block by row block, ``dW_i = s * up_i @ down``: the same down,
the up split by rows, the same alpha and rank. A file written with split pieces (sd-scripts'
``split_qkv``) stores a block-diagonal up and the pieces' downs stacked; that form is recognised and
read as pieces of rank ``r / n`` with alpha scaled so that alpha / rank is unchanged (the same
test diffusers' converter makes). Merging back is the inverse: a shared down if all pieces share
it, else downs stacked and a block-diagonal up. Both directions copy tensors; nothing is refitted.
Some pieces are stored with their two halves swapped (BFL / SAI ``shift, scale`` vs diffusers
``scale, shift``); ``swap_halves`` is its own inverse.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Piece:
    """One piece's LoRA: (down, up, alpha) as a file would store it."""

    down: Tensor
    up: Tensor
    alpha: float | None  # None: the file had no alpha (alpha = rank by the kohya convention)

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else self.alpha / self.rank


def swap_halves(up: Tensor) -> Tensor:
    """Swap the two row halves (``shift, scale`` <-> ``scale, shift``)."""
    first, second = up.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def _block_diagonal(up: Tensor, dims: list[int]) -> bool:
    """True when ``up`` is block diagonal: row block i uses only column block i (rank divisible by n)."""
    n = len(dims)
    if up.shape[1] % n:
        return False
    rank = up.shape[1] // n
    start = 0
    for i, rows in enumerate(dims):
        block = up[start:start + rows]
        outside = torch.cat([block[:, : i * rank], block[:, (i + 1) * rank:]], dim=1)
        if outside.numel() and bool(outside.any()):
            return False
        start += rows
    return True


def split(down: Tensor, up: Tensor, alpha: float | None, dims: list[int]) -> list[Piece]:
    """A LoRA on a fused weight as one LoRA per piece (rows ``dims`` of the fused output)."""
    if sum(dims) != up.shape[0]:
        raise ValueError(f"pieces of {dims} rows do not add up to the fused output of {up.shape[0]} rows")
    if len(dims) > 1 and _block_diagonal(up, dims):
        n, rank = len(dims), up.shape[1] // len(dims)
        piece_alpha = None if alpha is None else alpha * rank / up.shape[1]
        downs = down.chunk(n, dim=0)
        ups, start = [], 0
        for i, rows in enumerate(dims):
            ups.append(up[start:start + rows, i * rank:(i + 1) * rank])
            start += rows
        return [Piece(d.clone(), u.clone(), piece_alpha) for d, u in zip(downs, ups)]
    ups = torch.split(up, dims, dim=0)
    return [Piece(down.clone(), u.clone(), alpha) for u in ups]


def merge(pieces: list[Piece | None], dims: list[int]) -> Piece:
    """One LoRA on the fused weight from per-piece LoRAs (missing pieces get zero rows).

    Shared down and one alpha: up rows stacked. Otherwise the downs are stacked and the up is
    block diagonal, with alpha = total rank * the pieces' common scale; if the pieces' scales
    differ, each up is multiplied by its own scale and alpha = rank (scale 1).
    """
    present = [p for p in pieces if p is not None]
    if not present:
        raise ValueError("no piece to merge")
    first = present[0]
    dtype = first.up.dtype
    shared = all(p.down.shape == first.down.shape and torch.equal(p.down, first.down) and p.alpha == first.alpha for p in present)
    if shared:
        rows = [p.up if p is not None else torch.zeros(d, first.rank, dtype=dtype) for p, d in zip(pieces, dims)]
        return Piece(first.down.clone(), torch.cat(rows, dim=0), first.alpha)
    same_scale = len({p.scale for p in present}) == 1
    downs = [p.down for p in present]
    total = sum(p.rank for p in present)
    up = torch.zeros(sum(dims), total, dtype=dtype)
    row, col = 0, 0
    for piece, rows in zip(pieces, dims):
        if piece is not None:
            block = piece.up if same_scale else (piece.up.float() * piece.scale).to(dtype)
            up[row:row + rows, col:col + piece.rank] = block
            col += piece.rank
        row += rows
    alpha = first.scale * total if same_scale else float(total)
    return Piece(torch.cat(downs, dim=0), up, alpha)
