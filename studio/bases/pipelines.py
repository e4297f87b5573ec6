"""Load BASE as a live diffusers pipeline (folders of any family; SD / SDXL single files; hub ids online)."""

from __future__ import annotations

from pathlib import Path

import torch

from studio.bases import ARCHITECTURES, BASE_IDS, _arch_from_checkpoint, is_hub_id, is_offline, world_dir
from studio.errors import BaseNotFoundError


def _from_single_file(path: Path, dtype: torch.dtype):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if path.suffix != ".safetensors":
        raise BaseNotFoundError(f"{path}: only .safetensors checkpoints are loaded (pickle files are refused)")
    arch = _arch_from_checkpoint(path)
    if arch.startswith(("flux1", "sd3")):
        raise BaseNotFoundError(
            f"{path}: a single-file {arch} checkpoint holds the transformer only (its text encoders and configs "
            "come from elsewhere); give a diffusers pipeline folder instead"
        )
    cls = StableDiffusionXLPipeline if arch == "sdxl" else StableDiffusionPipeline
    return cls.from_single_file(str(path), dtype=dtype, local_files_only=is_offline())


def _resolve(base: str, dtype: torch.dtype):
    from diffusers import DiffusionPipeline

    path = world_dir() if base == "world" else Path(base)
    if path.is_dir():
        return DiffusionPipeline.from_pretrained(path, dtype=dtype, local_files_only=True, safety_checker=None)
    if path.is_file():
        return _from_single_file(path, dtype)
    if base == "world":
        raise BaseNotFoundError(f"the embedded world is missing at {path}; build it with `studio run pipelines/world.toml`")
    if is_hub_id(base):
        if is_offline():
            raise BaseNotFoundError(f"base {base!r} is a hub id but the studio is offline (HF_HUB_OFFLINE); give a local folder")
        return DiffusionPipeline.from_pretrained(base, dtype=dtype, use_safetensors=True)
    raise BaseNotFoundError(f"base {base!r}: no such folder or file, and not a hub id")


def load_pipeline(base: str, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"):
    """Load BASE as a diffusers pipeline (SD, SDXL, FLUX.1, SD3: whatever the folder's model_index names)."""
    if base in BASE_IDS or base in ARCHITECTURES:
        raise BaseNotFoundError(f"base {base!r} names an architecture without weights; give a folder, file or hub id")
    try:
        pipe = _resolve(base, dtype or torch.float32)
    except BaseNotFoundError:
        raise
    except (OSError, ValueError, EnvironmentError) as error:
        raise BaseNotFoundError(f"base {base!r} could not be loaded: {error}") from error
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
