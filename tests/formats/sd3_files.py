"""SD3 / SD3.5 LoRA files as kohya sd-scripts (networks/lora_sd3.py) names them, on SAI's MMDiT module list.

The module list follows SAI's reference MMDiT (``joint_blocks.N.x_block`` / ``context_block``,
``attn.qkv`` fused, ``attn2`` in SD3.5 Medium's first blocks, the last block's text stream
"pre only": ``attn.qkv`` and a 2 x width ``adaLN_modulation.1``), built from hyper-parameters, not
from diffusers or the studio's tables. sd-scripts wraps the Linears of every block (``SingleDiTBlock``)
and, with ``emb_dims``, the embedders and the final layer; CLIP-L / CLIP-G / T5 are ``lora_te1/2/3``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class MMDiTParams:
    """SD3.5 Medium by default (24 blocks of width 1536, attn2 in blocks 0-12)."""

    hidden: int = 1536
    depth: int = 24
    dual_attention: tuple[int, ...] = tuple(range(13))
    in_channels: int = 16
    patch: int = 2
    context_in: int = 4096
    pooled_in: int = 2048
    head_dim: int = 64


SD35_LARGE = MMDiTParams(hidden=2432, depth=38, dual_attention=())
TINY_SD3 = MMDiTParams(hidden=32, depth=2, dual_attention=(0,), in_channels=4, patch=1, context_in=64, pooled_in=64, head_dim=8)


def block_linears(p: MMDiTParams) -> dict[str, tuple[int, ...]]:
    """SAI path -> weight shape of every Linear inside the joint blocks (what sd-scripts targets)."""
    h, linears = p.hidden, {}
    for i in range(p.depth):
        last = i == p.depth - 1
        for stream in ("x_block", "context_block"):
            pre_only = last and stream == "context_block"
            dual = stream == "x_block" and i in p.dual_attention
            base = f"joint_blocks.{i}.{stream}"
            linears[f"{base}.attn.qkv"] = (3 * h, h)
            if not pre_only:
                linears[f"{base}.attn.proj"] = (h, h)
            if dual:
                linears[f"{base}.attn2.qkv"] = (3 * h, h)
                linears[f"{base}.attn2.proj"] = (h, h)
            if not pre_only:
                linears[f"{base}.mlp.fc1"] = (4 * h, h)
                linears[f"{base}.mlp.fc2"] = (h, 4 * h)
            linears[f"{base}.adaLN_modulation.1"] = ((2 if pre_only else 9 if dual else 6) * h, h)
    return linears


def embedder_linears(p: MMDiTParams) -> dict[str, tuple[int, ...]]:
    """The embedders and the final layer (sd-scripts' ``emb_dims``); ``x_embedder.proj`` is a conv."""
    h = p.hidden
    return {
        "context_embedder": (h, p.context_in), "t_embedder.mlp.0": (h, 256), "t_embedder.mlp.2": (h, h),
        "x_embedder.proj": (h, p.in_channels, p.patch, p.patch), "y_embedder.mlp.0": (h, p.pooled_in),
        "y_embedder.mlp.2": (h, h), "final_layer.adaLN_modulation.1": (2 * h, h),
        "final_layer.linear": (p.patch * p.patch * p.in_channels, h),
    }


def kohya_sd3_state_dict(p: MMDiTParams = MMDiTParams(), rank: int = 2, alpha: float = 1.0, seed: int = 0,
                         dtype: torch.dtype = torch.float32, embedders: bool = False) -> dict[str, torch.Tensor]:
    """The state dict sd-scripts saves for an SD3 LoRA on the MMDiT (no text encoders)."""
    generator = torch.Generator().manual_seed(seed)
    modules = dict(block_linears(p))
    if embedders:
        modules.update(embedder_linears(p))
    state = {}
    for name, shape in modules.items():
        out, inp, *kernel = shape
        stem = f"lora_unet_{name.replace('.', '_')}"
        state[f"{stem}.lora_down.weight"] = (torch.randn(rank, inp, *kernel, generator=generator) * 0.1).to(dtype)
        state[f"{stem}.lora_up.weight"] = (torch.randn(out, rank, *([1, 1] if kernel else []), generator=generator) * 0.1).to(dtype)
        state[f"{stem}.alpha"] = torch.tensor(alpha).to(dtype)
    return state


def sai_checkpoint(p: MMDiTParams, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A full SAI-named transformer state dict: ``weights`` where given, zeros elsewhere (for diffusers' converter)."""
    state = {"pos_embed": torch.zeros(1, 4, p.hidden)}
    for name, shape in {**block_linears(p), **embedder_linears(p)}.items():
        state[f"{name}.weight"] = weights.get(name, torch.zeros(shape))
        state[f"{name}.bias"] = torch.zeros(shape[0])
    for i in range(p.depth):
        attentions = ["x_block.attn", "context_block.attn"] + (["x_block.attn2"] if i in p.dual_attention else [])
        for attention in attentions:
            for norm in ("ln_q", "ln_k"):
                state[f"joint_blocks.{i}.{attention}.{norm}.weight"] = torch.zeros(p.head_dim)
    return state
