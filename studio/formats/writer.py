"""Write a `LoraAdapter` back to kohya or diffusers layout (atomically), carrying its metadata."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Literal

import torch

from studio.adapters.lora import LoraAdapter
from studio.fileio import save_safetensors
from studio.formats import transformer_files
from studio.formats.keys import file_module_name, kohya_name

ExportFormat = Literal["kohya", "diffusers"]


def _has_second_encoder(adapter: LoraAdapter) -> bool:
    return adapter.base_arch == "sdxl" or any(name.startswith("text_encoder_2.") for name in adapter.lora_layers)


def kohya_state_dict(adapter: LoraAdapter) -> dict[str, torch.Tensor]:
    """kohya / A1111 / ComfyUI keys: ``lora_unet_..._to_q.lora_down.weight``, ``.lora_up.weight``, ``.alpha``."""
    family = transformer_files.adapter_family(adapter)
    if family is not None:  # FLUX.1 / SD3: BFL / SAI names, fused qkv merged back
        return transformer_files.kohya_state_dict(adapter, family)
    second = _has_second_encoder(adapter)
    tensors = {}
    for module, layer in adapter.lora_layers.items():
        stem = kohya_name(file_module_name(module), second)
        tensors[f"{stem}.lora_down.weight"] = layer.down
        tensors[f"{stem}.lora_up.weight"] = layer.up
        tensors[f"{stem}.alpha"] = torch.tensor(layer.alpha, dtype=torch.float32)
    return tensors


def diffusers_state_dict(adapter: LoraAdapter) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """diffusers / peft keys ``unet.<module>.lora_A.weight`` plus the ``lora_adapter_metadata`` header.

    The header holds each component's LoraConfig (rank, alpha and their per-module patterns), the
    way diffusers' own ``save_lora_weights`` writes it, so that ``load_lora_weights`` applies the
    exact alpha / rank scale without touching the tensors.
    """
    tensors = {}
    for module, layer in adapter.lora_layers.items():
        tensors[f"{file_module_name(module)}.lora_A.weight"] = layer.down
        tensors[f"{file_module_name(module)}.lora_B.weight"] = layer.up
    return tensors, {"lora_adapter_metadata": json.dumps(_lora_configs(adapter), sort_keys=True)}


def _lora_configs(adapter: LoraAdapter) -> dict:
    packed: dict = {}
    components = sorted({module.partition(".")[0] for module in adapter.lora_layers})
    for component in components:
        # Patterns are module-path suffixes: without CLIP's ``text_model.`` level they match the
        # module names of old and new transformers alike.
        layers = {m.partition(".")[2]: l for m, l in adapter.lora_layers.items() if m.startswith(component + ".")}
        rank = Counter(l.rank for l in layers.values()).most_common(1)[0][0]
        alpha = Counter(l.alpha for l in layers.values()).most_common(1)[0][0]
        config = {
            "r": rank,
            "lora_alpha": alpha,
            "rank_pattern": {m: l.rank for m, l in layers.items() if l.rank != rank},
            "alpha_pattern": {m: l.alpha for m, l in layers.items() if l.alpha != alpha},
            "target_modules": sorted(layers),
        }
        packed.update({f"{component}.{key}": value for key, value in config.items()})
    return packed


def save_adapter(
    adapter: LoraAdapter,
    path: str | Path,
    format: ExportFormat = "kohya",
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write ``adapter`` to ``path`` in the given layout; the file's metadata is carried over."""
    header = {**adapter.metadata, **(metadata or {})}
    if format == "kohya":
        tensors = kohya_state_dict(adapter)
    elif format == "diffusers":
        tensors, extra = diffusers_state_dict(adapter)
        header.update(extra)
    else:
        raise ValueError(f"export format must be 'kohya' or 'diffusers', not {format!r}")
    return save_safetensors(tensors, path, header)
