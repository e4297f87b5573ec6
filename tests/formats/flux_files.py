"""Write FLUX.1 LoRA files the way kohya sd-scripts (networks/lora_flux.py) names and stores them.

The module list is BFL's reference model (flux/model.py, modules/layers.py), built here from its
hyper-parameters, not from diffusers or the studio's tables: sd-scripts wraps every Linear inside
each ``DoubleStreamBlock`` / ``SingleStreamBlock`` (plus, with ``in_dims``, ``img_in``, ``time_in``,
``vector_in``, ``guidance_in``, ``txt_in``), names it ``lora_unet_`` + the module path with dots as
underscores, CLIP-L layers ``lora_te1_...``, T5-XXL layers ``lora_te3_...``, and stores
``lora_down.weight`` (r, in), ``lora_up.weight`` (out, r) and ``alpha`` cast to the save dtype.
With ``split_qkv`` the fused qkv / linear1 LoRA is trained as one LoRA per piece and saved merged:
downs stacked, up block diagonal, one alpha (sd-scripts' ``LoRANetwork.state_dict``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file


@dataclass(frozen=True)
class FluxParams:
    """BFL FluxParams (FLUX.1-dev defaults)."""

    in_channels: int = 64
    vec_in_dim: int = 768
    context_in_dim: int = 4096
    hidden_size: int = 3072
    mlp_ratio: float = 4.0
    depth: int = 19
    depth_single_blocks: int = 38
    guidance_embed: bool = True
    clip_layers: int = 12
    clip_width: int = 768
    clip_mlp: int = 3072
    t5_layers: int = 24
    t5_width: int = 4096
    t5_inner: int = 4096  # num_heads * d_kv
    t5_ff: int = 10240


def bfl_linears(p: FluxParams, in_layers: bool = False) -> dict[str, tuple[int, int]]:
    """BFL module path -> (out, in) of every Linear sd-scripts targets, in module order."""
    h, mlp = p.hidden_size, int(p.hidden_size * p.mlp_ratio)
    linears: dict[str, tuple[int, int]] = {}
    if in_layers:
        linears.update({"img_in": (h, p.in_channels), "time_in.in_layer": (h, 256), "time_in.out_layer": (h, h),
                        "vector_in.in_layer": (h, p.vec_in_dim), "vector_in.out_layer": (h, h), "txt_in": (h, p.context_in_dim)})
        if p.guidance_embed:
            linears.update({"guidance_in.in_layer": (h, 256), "guidance_in.out_layer": (h, h)})
    for i in range(p.depth):
        for stream in ("img", "txt"):
            linears[f"double_blocks.{i}.{stream}_mod.lin"] = (6 * h, h)
            linears[f"double_blocks.{i}.{stream}_attn.qkv"] = (3 * h, h)
            linears[f"double_blocks.{i}.{stream}_attn.proj"] = (h, h)
            linears[f"double_blocks.{i}.{stream}_mlp.0"] = (mlp, h)
            linears[f"double_blocks.{i}.{stream}_mlp.2"] = (h, mlp)
    for i in range(p.depth_single_blocks):
        linears[f"single_blocks.{i}.linear1"] = (3 * h + mlp, h)
        linears[f"single_blocks.{i}.linear2"] = (h, h + mlp)
        linears[f"single_blocks.{i}.modulation.lin"] = (3 * h, h)
    return linears


def clip_linears(p: FluxParams) -> dict[str, tuple[int, int]]:
    w, ff = p.clip_width, p.clip_mlp
    linears = {}
    for i in range(p.clip_layers):
        for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
            linears[f"text_model.encoder.layers.{i}.self_attn.{proj}"] = (w, w)
        linears[f"text_model.encoder.layers.{i}.mlp.fc1"] = (ff, w)
        linears[f"text_model.encoder.layers.{i}.mlp.fc2"] = (w, ff)
    return linears


def t5_linears(p: FluxParams) -> dict[str, tuple[int, int]]:
    linears = {}
    for i in range(p.t5_layers):
        for proj in ("q", "k", "v"):
            linears[f"encoder.block.{i}.layer.0.SelfAttention.{proj}"] = (p.t5_inner, p.t5_width)
        linears[f"encoder.block.{i}.layer.0.SelfAttention.o"] = (p.t5_width, p.t5_inner)
        linears[f"encoder.block.{i}.layer.1.DenseReluDense.wi_0"] = (p.t5_ff, p.t5_width)
        linears[f"encoder.block.{i}.layer.1.DenseReluDense.wi_1"] = (p.t5_ff, p.t5_width)
        linears[f"encoder.block.{i}.layer.1.DenseReluDense.wo"] = (p.t5_width, p.t5_ff)
    return linears


def _split_dims(name: str, out: int, h: int) -> list[int] | None:
    if name.endswith("_attn.qkv"):
        return [h] * 3
    if name.endswith(".linear1"):
        return [h] * 3 + [out - 3 * h]
    return None


def _lora(out: int, inp: int, rank: int, generator: torch.Generator, split: list[int] | None) -> tuple[torch.Tensor, torch.Tensor]:
    if split is None:
        return torch.randn(rank, inp, generator=generator) / inp**0.5, torch.randn(out, rank, generator=generator) * 0.1
    downs = [torch.randn(rank, inp, generator=generator) / inp**0.5 for _ in split]
    up = torch.zeros(out, rank * len(split))
    row = 0
    for j, rows in enumerate(split):
        up[row:row + rows, j * rank:(j + 1) * rank] = torch.randn(rows, rank, generator=generator) * 0.1
        row += rows
    return torch.cat(downs, dim=0), up


def kohya_flux_state_dict(
    p: FluxParams = FluxParams(), rank: int = 4, alpha: float = 2.0, seed: int = 0, dtype: torch.dtype = torch.bfloat16,
    split_qkv: bool = False, text_encoders: tuple[str, ...] = ("clip",), in_layers: bool = False,
) -> dict[str, torch.Tensor]:
    """The state dict sd-scripts saves for a FLUX.1 LoRA (``--save_precision`` = ``dtype``)."""
    generator = torch.Generator().manual_seed(seed)
    modules = [("lora_unet", name, shape) for name, shape in bfl_linears(p, in_layers).items()]
    if "clip" in text_encoders:
        modules += [("lora_te1", name, shape) for name, shape in clip_linears(p).items()]
    if "t5" in text_encoders:
        modules += [("lora_te3", name, shape) for name, shape in t5_linears(p).items()]
    state = {}
    for prefix, name, (out, inp) in modules:
        split = _split_dims(name, out, p.hidden_size) if split_qkv and prefix == "lora_unet" else None
        down, up = _lora(out, inp, rank, generator, split)
        stem = f"{prefix}.{name}".replace(".", "_")
        state[f"{stem}.lora_down.weight"] = down.to(dtype)
        state[f"{stem}.lora_up.weight"] = up.to(dtype)
        state[f"{stem}.alpha"] = torch.tensor(alpha).to(dtype)
    return state


def write_kohya_flux(path: str | Path, **options) -> Path:
    """Save a kohya FLUX.1 LoRA with sd-scripts' ``ss_*`` metadata."""
    state = kohya_flux_state_dict(**options)
    metadata = {"ss_network_module": "networks.lora_flux", "ss_base_model_version": "flux1",
                "ss_network_dim": str(options.get("rank", 4)), "ss_network_alpha": str(options.get("alpha", 2.0))}
    save_file(state, str(path), metadata=metadata)
    return Path(path)


TINY_FLUX = FluxParams(in_channels=4, vec_in_dim=32, context_in_dim=32, hidden_size=32, depth=1, depth_single_blocks=2,
                       clip_layers=2, clip_width=32, clip_mlp=64, t5_layers=2, t5_width=32, t5_inner=32, t5_ff=64)
