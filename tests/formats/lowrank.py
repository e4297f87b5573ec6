"""Compare low-rank products B @ A without forming them (FLUX.1-dev deltas are too big to materialise)."""

from __future__ import annotations

import re

import torch
from torch import Tensor


def product_error(a1: Tensor, b1: Tensor, a2: Tensor, b2: Tensor) -> float:
    """||B1 A1 - B2 A2||_F / ||B1 A1||_F from r x r Gram matrices, in float64."""
    a1, b1, a2, b2 = (t.double().flatten(1) for t in (a1, b1, a2, b2))

    def inner(ax, bx, ay, by):  # <Bx Ax, By Ay> = tr((Bx^T By)(Ay Ax^T))
        return float(torch.trace((bx.T @ by) @ (ay @ ax.T)))

    first = inner(a1, b1, a1, b1)
    squared = first - 2 * inner(a1, b1, a2, b2) + inner(a2, b2, a2, b2)
    return (max(squared, 0.0) / first) ** 0.5 if first > 0 else squared**0.5


CLIP_OLD = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}


def diffusers_pairs(state: dict[str, Tensor]) -> dict[str, tuple[Tensor, Tensor]]:
    """module -> (A, B) of a diffusers state dict (peft lora_A/B, or the old te ``to_q_lora.down`` keys)."""
    parts: dict[str, dict[str, Tensor]] = {}
    for key, value in state.items():
        match = re.fullmatch(r"(.+)\.lora_([AB])\.weight", key)
        if match:
            module, which = match.group(1), "A" if match.group(2) == "A" else "B"
        elif match := re.fullmatch(r"(.+)\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight", key):
            module, which = f"{match.group(1)}.{CLIP_OLD[match.group(2)]}", "A" if match.group(3) == "down" else "B"
        elif match := re.fullmatch(r"(.+)\.lora_linear_layer\.(down|up)\.weight", key):
            module, which = match.group(1), "A" if match.group(2) == "down" else "B"
        else:
            continue
        parts.setdefault(module, {})[which] = value
    return {module: (p["A"], p["B"]) for module, p in parts.items()}
