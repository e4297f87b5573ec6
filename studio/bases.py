"""Resolve BASE to a pipeline, or to a weightless module tree for key checks.

BASE is one of:
- ``world``: the embedded default pipeline shipped in ``assets/world``;
- ``sd15``, ``sd2``, ``sdxl``: the real architectures, built from bundled configs on the meta
  device (no weights; for validating and mapping adapter keys);
- a local diffusers folder (``model_index.json`` inside);
- a single-file checkpoint (``.safetensors``);
- a hub id (``org/name``), only when online.

Module trees are derived from the models' own module hierarchy, never from a hand-written table.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from studio.errors import BaseNotFoundError

ARCHITECTURES = ("sd15", "sd2", "sdxl")
CONFIG_DIR = Path(__file__).parent / "configs"
REPO_ROOT = Path(__file__).resolve().parents[1]
ARCH_LABELS = {"sd15": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL", "world": "the embedded world"}


@dataclass(frozen=True)
class ModuleInfo:
    """A module an adapter can target: its kind and weight shape."""

    kind: Literal["linear", "conv"]
    weight_shape: tuple[int, ...]


@dataclass
class ModuleTree:
    """The targetable modules of a pipeline, keyed by prefixed diffusers module names."""

    arch: str
    modules: dict[str, ModuleInfo]
    unet_config: dict = field(default_factory=dict)

    @property
    def components(self) -> list[str]:
        return sorted({name.partition(".")[0] for name in self.modules})

    @property
    def label(self) -> str:
        return ARCH_LABELS.get(self.arch, self.arch)


def world_dir() -> Path:
    """Where the embedded world lives (``STUDIO_WORLD_DIR`` overrides the bundled one)."""
    return Path(os.environ.get("STUDIO_WORLD_DIR", REPO_ROOT / "assets" / "world"))


def tree_from_components(components: dict[str, nn.Module], arch: str, unet_config: dict | None = None) -> ModuleTree:
    """Collect every Linear / Conv2d of the given components (a live or meta pipeline)."""
    modules: dict[str, ModuleInfo] = {}
    for component_name, component in components.items():
        for module_name, module in component.named_modules():
            if isinstance(module, nn.Linear):
                kind = "linear"
            elif isinstance(module, nn.Conv2d):
                kind = "conv"
            else:
                continue
            modules[f"{component_name}.{module_name}"] = ModuleInfo(kind, tuple(module.weight.shape))
    return ModuleTree(arch, modules, dict(unet_config or {}))


def _arch_config(arch: str) -> dict:
    return json.loads((CONFIG_DIR / f"{arch}.json").read_text())


def _text_encoder_on_meta(config: dict) -> nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = dict(config)
    cls = CLIPTextModelWithProjection if config.pop("_class") == "CLIPTextModelWithProjection" else CLIPTextModel
    with torch.device("meta"):
        return cls(CLIPTextConfig(**config))


def _unet_on_meta(config: dict) -> nn.Module:
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel.from_config(config)


@functools.lru_cache(maxsize=8)
def architecture_tree(arch: str) -> ModuleTree:
    """The module tree of a real architecture (sd15, sd2, sdxl), built on the meta device."""
    if arch not in ARCHITECTURES:
        raise BaseNotFoundError(f"unknown architecture {arch!r}; known: {', '.join(ARCHITECTURES)}")
    config = _arch_config(arch)
    components: dict[str, nn.Module] = {"unet": _unet_on_meta(config["unet"])}
    for name in ("text_encoder", "text_encoder_2"):
        if name in config:
            components[name] = _text_encoder_on_meta(config[name])
    return tree_from_components(components, arch, config["unet"])


@functools.lru_cache(maxsize=8)
def _folder_tree(folder: str) -> ModuleTree:
    from diffusers import UNet2DConditionModel
    from transformers import AutoConfig, CLIPTextModel, CLIPTextModelWithProjection

    root = Path(folder)
    index = json.loads((root / "model_index.json").read_text())
    unet_config = UNet2DConditionModel.load_config(root / "unet")
    components: dict[str, nn.Module] = {"unet": _unet_on_meta(unet_config)}
    for name in ("text_encoder", "text_encoder_2"):
        if name not in index or index[name][0] is None:
            continue
        config = AutoConfig.from_pretrained(root / name, local_files_only=True)
        cls = CLIPTextModelWithProjection if index[name][1] == "CLIPTextModelWithProjection" else CLIPTextModel
        with torch.device("meta"):
            components[name] = cls(config)
    arch = "world" if root.resolve() == world_dir().resolve() else _arch_from_unet_config(dict(unet_config))
    return tree_from_components(components, arch, dict(unet_config))


def _arch_from_unet_config(unet_config: dict) -> str:
    """Name the architecture a UNet config belongs to, or 'custom'."""
    for arch in ARCHITECTURES:
        reference = _arch_config(arch)["unet"]
        keys = ("block_out_channels", "cross_attention_dim", "down_block_types")
        if all(list(unet_config.get(k, [])) == list(reference[k]) if isinstance(reference[k], list) else unet_config.get(k) == reference[k] for k in keys):
            return arch
    return "custom"


def _arch_from_checkpoint(path: Path) -> str:
    """Guess a single-file checkpoint's architecture from its keys and shapes (no weights read)."""
    from studio.formats.safe import read_header

    header, _ = read_header(path)
    if any(key.startswith("conditioner.embedders.1") for key in header):
        return "sdxl"
    probe = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    if probe in header:
        width = header[probe]["shape"][1]
        return {768: "sd15", 1024: "sd2"}.get(width, "custom")
    raise BaseNotFoundError(f"{path}: not a Stable Diffusion checkpoint (no UNet keys found)")


def is_hub_id(base: str) -> bool:
    parts = base.split("/")
    return len(parts) == 2 and all(parts) and not Path(base).exists()


def module_tree(base: str) -> ModuleTree:
    """Resolve BASE to its weightless module tree."""
    if base in ARCHITECTURES:
        return architecture_tree(base)
    path = world_dir() if base == "world" else Path(base)
    if path.is_dir():
        if not (path / "model_index.json").exists():
            raise BaseNotFoundError(f"{path}: not a diffusers pipeline folder (no model_index.json)")
        return _folder_tree(str(path.resolve()))
    if path.is_file():
        arch = _arch_from_checkpoint(path)
        if arch == "custom":
            raise BaseNotFoundError(f"{path}: checkpoint architecture not recognised")
        return architecture_tree(arch)
    if base == "world":
        raise BaseNotFoundError(f"the embedded world is missing at {path}; build it with `studio run pipelines/world.toml`")
    if is_hub_id(base):
        return tree_from_components(_hub_pipeline_components(base), "hub")
    raise BaseNotFoundError(f"base {base!r}: no such folder or file, and not an architecture ({', '.join(ARCHITECTURES)}) or hub id")


def is_offline() -> bool:
    """True when the hub must not be reached (HF_HUB_OFFLINE, or STUDIO_OFFLINE=1)."""
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false") or os.environ.get("STUDIO_OFFLINE") == "1"


def _hub_pipeline_components(hub_id: str) -> dict[str, nn.Module]:
    pipe = load_pipeline(hub_id)
    return {name: getattr(pipe, name) for name in ("unet", "text_encoder", "text_encoder_2") if getattr(pipe, name, None) is not None}


def load_pipeline(base: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """Load BASE as a diffusers pipeline (StableDiffusionPipeline or StableDiffusionXLPipeline)."""
    from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

    if base in ARCHITECTURES:
        raise BaseNotFoundError(f"base {base!r} names an architecture without weights; give a folder, file or hub id")
    path = world_dir() if base == "world" else Path(base)
    try:
        if path.is_dir():
            pipe = DiffusionPipeline.from_pretrained(path, dtype=dtype, local_files_only=True, safety_checker=None)
        elif path.is_file():
            if path.suffix != ".safetensors":
                raise BaseNotFoundError(f"{path}: only .safetensors checkpoints are loaded (pickle files are refused)")
            cls = StableDiffusionXLPipeline if _arch_from_checkpoint(path) == "sdxl" else StableDiffusionPipeline
            pipe = cls.from_single_file(str(path), dtype=dtype, local_files_only=is_offline())
        elif base == "world":
            raise BaseNotFoundError(f"the embedded world is missing at {path}; build it with `studio run pipelines/world.toml`")
        elif is_hub_id(base):
            if is_offline():
                raise BaseNotFoundError(f"base {base!r} is a hub id but the studio is offline (HF_HUB_OFFLINE); give a local folder")
            pipe = DiffusionPipeline.from_pretrained(base, dtype=dtype, use_safetensors=True)
        else:
            raise BaseNotFoundError(f"base {base!r}: no such folder or file, and not a hub id")
    except BaseNotFoundError:
        raise
    except (OSError, ValueError, EnvironmentError) as error:
        raise BaseNotFoundError(f"base {base!r} could not be loaded: {error}") from error
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def pipeline_tree(pipe, arch: str = "live") -> ModuleTree:
    """The module tree of a live pipeline."""
    components = {name: getattr(pipe, name) for name in ("unet", "text_encoder", "text_encoder_2") if getattr(pipe, name, None) is not None}
    return tree_from_components(components, arch, dict(pipe.unet.config))
