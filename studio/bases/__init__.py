"""Resolve BASE to a pipeline, or to a weightless module tree for key checks.

BASE is one of:
- ``world``: the embedded default pipeline shipped in ``assets/world``;
- ``sd15``, ``sd2``, ``sdxl``, ``flux1`` (FLUX.1-dev; ``flux1-schnell``), ``sd3`` (SD3.5 Large or
  Medium, whichever a file fits; ``sd3.5-large``, ``sd3.5-medium``): the real architectures, as
  module trees stored as data (generated from the models on the meta device by
  ``python -m studio.bases.build_trees``; for validating and mapping adapter keys);
- a local diffusers folder (``model_index.json`` inside; its tree is cached on first use);
- a single-file checkpoint (``.safetensors``);
- a hub id (``org/name``), only when online.

Reading a stored or cached tree imports neither torch nor diffusers. Module trees are derived
from the models' own module hierarchy, never from a hand-written table. `Base` (in
`studio.bases.family`) describes each denoiser family for the engine and the trainer.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

from studio.bases.family import ARCH_LABELS, BASES, Base, arch_label, base_for, base_of, family_of
from studio.bases.trees import ModuleInfo, ModuleTree, cached_folder_tree, stored_tree
from studio.errors import BaseNotFoundError

ARCHITECTURES = ("sd15", "sd2", "sdxl", "flux1", "sd3.5-large", "sd3.5-medium", "flux1-schnell")
ALIASES = {"sd3": ("sd3.5-large", "sd3.5-medium"), "flux1-dev": ("flux1",), "sd3.5": ("sd3.5-large", "sd3.5-medium")}
BASE_IDS = ARCHITECTURES + tuple(ALIASES)
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
REPO_ROOT = Path(__file__).resolve().parents[2]

__all__ = [
    "ALIASES", "ARCHITECTURES", "ARCH_LABELS", "BASES", "BASE_IDS", "Base", "CONFIG_DIR", "ModuleInfo", "ModuleTree",
    "arch_label", "architecture_tree", "base_for", "base_of", "family_of", "is_hub_id", "is_offline", "load_pipeline",
    "module_tree", "pipeline_tree", "tree_from_components", "world_dir",
]


def world_dir() -> Path:
    """Where the embedded world lives (``STUDIO_WORLD_DIR`` overrides the bundled one)."""
    return Path(os.environ.get("STUDIO_WORLD_DIR", REPO_ROOT / "assets" / "world"))


def tree_from_components(components, arch: str, unet_config: dict | None = None) -> ModuleTree:
    """Collect every Linear / Conv2d of the given components (a live or meta pipeline)."""
    from studio.bases.meta import tree_from_components as collect

    return collect(components, arch, unet_config)


def architecture_tree(arch: str) -> ModuleTree:
    """The module tree of a real architecture or alias (``sd3`` stands for SD3.5 Large and Medium)."""
    if arch in ALIASES:
        first, *others = ALIASES[arch]
        main = stored_tree(first)
        return ModuleTree(main.arch, main.modules, main.unet_config, tuple(stored_tree(a) for a in others))
    if arch not in ARCHITECTURES:
        raise BaseNotFoundError(f"unknown architecture {arch!r}; known: {', '.join(BASE_IDS)}")
    return stored_tree(arch)


@functools.lru_cache(maxsize=16)
def _arch_config(arch: str) -> dict:
    return json.loads((CONFIG_DIR / f"{arch}.json").read_text())


CONFIG_KEYS = {
    "unet": ("block_out_channels", "cross_attention_dim", "down_block_types"),
    "transformer": ("num_layers", "num_attention_heads", "attention_head_dim", "joint_attention_dim", "guidance_embeds", "dual_attention_layers", "num_single_layers"),
}


def _matches(config: dict, reference: dict, keys: tuple[str, ...]) -> bool:
    def norm(value):  # a key a folder's config.json leaves out means the default: empty / off
        return list(value) if isinstance(value, (list, tuple)) and value else (value or None)

    return all(norm(config.get(k)) == norm(reference.get(k)) for k in keys)


def arch_from_denoiser_config(config: dict) -> str:
    """Name the architecture a UNet / transformer config belongs to, or ``custom`` / ``<family>-custom``."""
    family = family_of("", config)
    kind = "transformer" if family in ("flux1", "sd3") else "unet"
    for arch in ARCHITECTURES:
        reference = _arch_config(arch)
        if kind in reference and _matches(config, reference[kind], CONFIG_KEYS[kind]):
            return arch
    return f"{family}-custom" if kind == "transformer" else "custom"


def _folder_arch(root: Path, denoiser_config: dict) -> str:
    if root.resolve() == world_dir().resolve():
        return "world"
    return arch_from_denoiser_config(denoiser_config)


def _build_folder_tree(root: Path) -> ModuleTree:
    from studio.bases.meta import build_folder_tree

    return build_folder_tree(root, _folder_arch)


@functools.lru_cache(maxsize=8)
def _folder_tree(folder: str) -> ModuleTree:
    root = Path(folder)
    tree = cached_folder_tree(root, _build_folder_tree)
    if tree.arch == "world" and root.resolve() != world_dir().resolve():  # a copy of the world elsewhere
        tree = ModuleTree("custom", tree.modules, tree.unet_config)
    return tree


def _arch_from_checkpoint(path: Path) -> str:
    """Guess a single-file checkpoint's architecture from its keys and shapes (no weights read)."""
    from studio.formats.safe import read_header

    header, _ = read_header(path)
    keys = {key.removeprefix("model.diffusion_model.") for key in header}
    if "double_blocks.0.img_attn.qkv.weight" in keys:
        return "flux1" if any(k.startswith("guidance_in.") for k in keys) else "flux1-schnell"
    if "joint_blocks.0.x_block.attn.qkv.weight" in keys:
        width = header[next(k for k in header if k.endswith("joint_blocks.0.x_block.attn.qkv.weight"))]["shape"][1]
        return {2432: "sd3.5-large", 1536: "sd3.5-medium"}.get(width, "sd3-custom")
    if any(key.startswith("conditioner.embedders.1") for key in header):
        return "sdxl"
    probe = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    if probe in header:
        width = header[probe]["shape"][1]
        return {768: "sd15", 1024: "sd2"}.get(width, "custom")
    raise BaseNotFoundError(f"{path}: not a Stable Diffusion / FLUX.1 / SD3 checkpoint (no UNet or transformer keys found)")


def is_hub_id(base: str) -> bool:
    parts = base.split("/")
    return len(parts) == 2 and all(parts) and not Path(base).exists()


def module_tree(base: str) -> ModuleTree:
    """Resolve BASE to its weightless module tree."""
    if base in BASE_IDS:
        return architecture_tree(base)
    path = world_dir() if base == "world" else Path(base)
    if path.is_dir():
        if not (path / "model_index.json").exists():
            raise BaseNotFoundError(f"{path}: not a diffusers pipeline folder (no model_index.json)")
        return _folder_tree(str(path.resolve()))
    if path.is_file():
        arch = _arch_from_checkpoint(path)
        if arch.endswith("custom"):
            raise BaseNotFoundError(f"{path}: checkpoint architecture not recognised")
        return architecture_tree(arch)
    if base == "world":
        raise BaseNotFoundError(f"the embedded world is missing at {path}; build it with `studio run pipelines/world.toml`")
    if is_hub_id(base):
        return pipeline_tree(load_pipeline(base), "hub")
    raise BaseNotFoundError(f"base {base!r}: no such folder or file, and not an architecture ({', '.join(BASE_IDS)}) or hub id")


def is_offline() -> bool:
    """True when the hub must not be reached (HF_HUB_OFFLINE, or STUDIO_OFFLINE=1)."""
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false") or os.environ.get("STUDIO_OFFLINE") == "1"


def load_pipeline(base: str, dtype=None, device="cpu"):
    """Load BASE as a diffusers pipeline (SD, SDXL, FLUX.1 or SD3 from a folder; SD / SDXL single files)."""
    from studio.bases.pipelines import load_pipeline as load

    return load(base, dtype, device)


def pipeline_tree(pipe, arch: str = "live") -> ModuleTree:
    """The module tree of a live pipeline: its denoiser and text encoders."""
    from studio.bases.meta import DENOISERS, TEXT_ENCODERS

    from torch import nn

    components = {name: getattr(pipe, name) for name in DENOISERS + TEXT_ENCODERS if isinstance(getattr(pipe, name, None), nn.Module)}
    denoiser = next(name for name in DENOISERS if name in components)
    config = dict(components[denoiser].config)
    config.setdefault("_class_name", type(components[denoiser]).__name__)
    return tree_from_components(components, arch, config)
