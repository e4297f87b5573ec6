"""Write a `LoraAdapter` back to kohya or diffusers layout (atomically), carrying its metadata.

kohya layout (what kohya sd-scripts, A1111 and ComfyUI read): ``lora_unet_*`` / ``lora_te*_*``
stems with ``.lora_down.weight``, ``.lora_up.weight`` and ``.alpha``; SDXL UNet stems in the
original SGM naming kohya itself writes (``lora_unet_input_blocks_4_1_...``), SD1.x in diffusers
naming (as kohya's SD1 networks do). ``sshs_model_hash`` / ``sshs_legacy_hash`` are recomputed as
kohya's ``train_util.precalculate_safetensors_hashes`` does, since A1111 uses them as the file's
identity.

diffusers layout (what diffusers' ``load_lora_weights`` and peft read): ``unet.<module>.lora_A``
/ ``lora_B`` with each layer's alpha / rank scale baked into ``lora_B`` (alpha = rank), so a
reader that ignores ``lora_adapter_metadata`` (ComfyUI) still applies the right values; the
header carries diffusers' own ``lora_adapter_metadata`` too.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from io import BytesIO
from pathlib import Path
from typing import Literal

import torch

from studio.adapters.lora import LoraAdapter, LoraLayer
from studio.fileio import save_safetensors
from studio.formats import transformer_files
from studio.formats.keys import file_module_name, kohya_stem

ExportFormat = Literal["kohya", "diffusers"]
STALE_METADATA = ("sshs_model_hash", "sshs_legacy_hash", "modelspec.hash_sha256", "lora_adapter_metadata", "format")


def _has_second_encoder(adapter: LoraAdapter) -> bool:
    return adapter.base_arch == "sdxl" or any(name.startswith("text_encoder_2.") for name in adapter.lora_layers)


def _sgm_config(adapter: LoraAdapter) -> dict | None:
    """The UNet config whose SGM names kohya writes: SDXL only (kohya's SD1 files use diffusers names)."""
    if adapter.base_arch != "sdxl":
        return None
    from studio.bases import architecture_tree

    return architecture_tree("sdxl").unet_config


def common_alpha(adapter: LoraAdapter) -> float:
    """The alpha most layers have (non-zero), written for every layer of a kohya file."""
    counts = Counter(layer.alpha for layer in adapter.lora_layers.values() if layer.alpha != 0)
    return counts.most_common(1)[0][0] if counts else 1.0


def scaled_up(up: torch.Tensor, factor: float) -> torch.Tensor:
    """``up * factor`` computed in float32, kept in ``up``'s dtype only when that is exact.

    A power-of-two factor only moves exponents; any other factor rounded back into bf16 / fp16
    costs ~1e-3 relative dW (a bf16 FLUX file baked at alpha / rank = 1/6 read back 2e-3 off),
    so those ups are written in float32 (every loader casts factors to its compute dtype).
    """
    scaled = up.float() * factor
    exact = up.dtype == torch.float32 or (factor != 0 and math.frexp(abs(factor))[0] == 0.5)
    return scaled.to(up.dtype) if exact else scaled


def with_alpha(layer: LoraLayer, alpha: float) -> LoraLayer:
    """The same dW written with another alpha: (old alpha / new alpha) multiplied into ``up``."""
    if layer.alpha == alpha:
        return layer
    return LoraLayer(layer.down, scaled_up(layer.up, layer.alpha / alpha), float(alpha), layer.alpha_source)


def kohya_state_dict(adapter: LoraAdapter) -> dict[str, torch.Tensor]:
    """kohya / A1111 / ComfyUI keys: ``lora_unet_..._to_q.lora_down.weight``, ``.lora_up.weight``, ``.alpha``.

    Every layer is written with the adapter's most common alpha; a layer with another alpha gets
    the ratio multiplied into ``up`` (same dW). diffusers' kohya conversion drops per-layer alphas
    of attention projections (their alpha keys keep the ``processor.to_q_lora`` name and match no
    module), so one alpha for all layers is what makes it read the file exactly too.
    """
    family = transformer_files.adapter_family(adapter)
    if family is not None:  # FLUX.1 / SD3: BFL / SAI names, fused qkv merged back
        return transformer_files.kohya_state_dict(adapter, family)
    second, config = _has_second_encoder(adapter), _sgm_config(adapter)
    alpha = common_alpha(adapter)
    tensors = {}
    for module, layer in adapter.lora_layers.items():
        layer = with_alpha(layer, alpha)
        stem = kohya_stem(module, second, config)
        if f"{stem}.alpha" in tensors:
            raise ValueError(f"two layers map to the kohya name {stem!r}")
        tensors[f"{stem}.lora_down.weight"] = layer.down
        tensors[f"{stem}.lora_up.weight"] = layer.up
        tensors[f"{stem}.alpha"] = torch.tensor(layer.alpha, dtype=torch.float32)
    return tensors


def baked(layer: LoraLayer) -> LoraLayer:
    """The same dW with alpha = rank: the scale alpha / rank multiplied into ``up`` (`scaled_up`: exact)."""
    if layer.alpha == layer.rank:
        return layer
    return LoraLayer(layer.down, scaled_up(layer.up, layer.scale), float(layer.rank), layer.alpha_source)


def diffusers_state_dict(adapter: LoraAdapter) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """diffusers / peft keys ``unet.<module>.lora_A.weight`` (scale baked in) plus ``lora_adapter_metadata``.

    The header holds each component's LoraConfig (rank and its per-module pattern; alpha = rank
    everywhere after baking), the way diffusers' own ``save_lora_weights`` writes it.
    """
    layers = {module: baked(layer) for module, layer in adapter.lora_layers.items()}
    tensors = {}
    for module, layer in layers.items():
        tensors[f"{file_module_name(module)}.lora_A.weight"] = layer.down
        tensors[f"{file_module_name(module)}.lora_B.weight"] = layer.up
    return tensors, {"lora_adapter_metadata": json.dumps(_lora_configs(layers), sort_keys=True)}


ANCHORED = ("unet", "transformer")  # denoisers: FLUX's top-level proj_out is a suffix of every single block's


def _pattern_key(component: str, path: str) -> str:
    """A rank / alpha pattern key for one module.

    peft matches pattern keys as module-path suffixes (``get_pattern_key``) and takes the first
    that fits, so ``proj_out`` would also claim ``single_transformer_blocks.N.proj_out``; denoiser
    keys are anchored with ``^`` as diffusers' own loader does (peft PR 2419). Text-encoder keys
    stay suffixes, without CLIP's ``text_model.`` level, to match old and new transformers alike.
    """
    return f"^{path}" if component in ANCHORED else path


def _lora_configs(all_layers: dict[str, LoraLayer]) -> dict:
    packed: dict = {}
    components = sorted({module.partition(".")[0] for module in all_layers})
    for component in components:
        layers = {m.partition(".")[2]: l for m, l in all_layers.items() if m.startswith(component + ".")}
        rank = Counter(l.rank for l in layers.values()).most_common(1)[0][0]
        alpha = Counter(l.alpha for l in layers.values()).most_common(1)[0][0]
        config = {
            "r": rank,
            "lora_alpha": alpha,
            "rank_pattern": {_pattern_key(component, m): l.rank for m, l in layers.items() if l.rank != rank},
            "alpha_pattern": {_pattern_key(component, m): l.alpha for m, l in layers.items() if l.alpha != alpha},
            "target_modules": sorted(layers),
        }
        packed.update({f"{component}.{key}": value for key, value in config.items()})
    return packed


def kohya_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[str, str]:
    """(sshs_model_hash, sshs_legacy_hash) as kohya's ``precalculate_safetensors_hashes`` computes them.

    The file is serialised in memory with only the ``ss_*`` metadata; the model hash is the
    SHA-256 of everything after the header, the legacy hash the first 8 hex digits of the SHA-256
    of the 64 KiB at offset 1 MiB (sd-webui-additional-networks' ``addnet_hash_*``).
    """
    from safetensors.torch import save

    clean = {key: value.detach().contiguous().cpu() for key, value in tensors.items()}
    data = save(clean, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    header_len = int.from_bytes(data[:8], "little")
    model_hash = hashlib.sha256(data[8 + header_len:]).hexdigest()
    stream = BytesIO(data)
    stream.seek(0x100000)
    legacy_hash = hashlib.sha256(stream.read(0x10000)).hexdigest()[:8]
    return model_hash, legacy_hash


def layout_tensors(adapter: LoraAdapter, format: ExportFormat, metadata: dict[str, str] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and header metadata of ``adapter`` in a layout (what ``save_adapter`` writes)."""
    header = {k: v for k, v in {**adapter.metadata, **(metadata or {})}.items() if k not in STALE_METADATA}
    if format == "kohya":
        tensors = kohya_state_dict(adapter)
        header["sshs_model_hash"], header["sshs_legacy_hash"] = kohya_hashes(tensors, header)
    elif format == "diffusers":
        tensors, extra = diffusers_state_dict(adapter)
        header.update(extra)
    else:
        raise ValueError(f"export format must be 'kohya' or 'diffusers', not {format!r}")
    return tensors, {str(k): str(v) for k, v in header.items()}


def save_adapter(
    adapter: LoraAdapter,
    path: str | Path,
    format: ExportFormat = "kohya",
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write ``adapter`` to ``path`` in the given layout; the file's metadata is carried over.

    Stale identity fields of the source (``sshs_*`` hashes, ``modelspec.hash_sha256``) are
    dropped; a kohya file gets fresh ``sshs_*`` hashes of what is written.
    """
    tensors, header = layout_tensors(adapter, format, metadata)
    return save_safetensors(tensors, path, header)
