"""Module trees as data: the targetable modules of a base, read from JSON without torch or diffusers.

A tree lists every Linear / Conv2d of the components that can hold adapters, keyed by prefixed
diffusers module names (``unet.down_blocks.0...``, ``transformer.transformer_blocks.0.attn.to_q``,
``text_encoder_2.encoder.block.0.layer.0.SelfAttention.q``) with its weight shape. Trees of the
real architectures are generated once from the models' own module hierarchy on the meta device
(``python -m studio.bases.build_trees``) and committed under ``studio/bases/trees/``; trees of
local folders are built on first use and cached under the user cache dir, keyed by the folder's
config files and the diffusers / transformers versions (module names change across versions).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Literal

TREE_DIR = Path(__file__).parent / "trees"
TREE_FORMAT = 1  # bump when the JSON layout or the way trees are collected changes


@dataclass(frozen=True)
class ModuleInfo:
    """A module an adapter can target: its kind and weight shape."""

    kind: Literal["linear", "conv"]
    weight_shape: tuple[int, ...]


@dataclass
class ModuleTree:
    """The targetable modules of a pipeline, keyed by prefixed diffusers module names.

    ``unet_config`` holds the denoiser's config (UNet or transformer; the name is kept for the
    code that reads SDXL's ``layers_per_block`` from it). ``alternatives`` are other trees the
    same BASE id stands for (``sd3``: SD3.5 Large and Medium); a file is placed on the best fit.
    """

    arch: str
    modules: dict[str, ModuleInfo]
    unet_config: dict = field(default_factory=dict)
    alternatives: tuple["ModuleTree", ...] = ()

    @property
    def components(self) -> list[str]:
        return sorted({name.partition(".")[0] for name in self.modules})

    @property
    def label(self) -> str:
        from studio.bases.family import arch_label

        return arch_label(self.arch)

    @property
    def family(self) -> str:
        """The denoiser family id (``sd``, ``sdxl``, ``flux1``, ``sd3``) of this tree."""
        from studio.bases.family import family_of

        return family_of(self.arch, self.unet_config)

    def variants(self) -> list["ModuleTree"]:
        """This tree and its alternatives, the candidates a file is fitted against."""
        return [self, *self.alternatives]


def tree_to_json(tree: ModuleTree) -> dict:
    """The JSON form of a tree: ``{"arch", "config", "modules": {name: [kind, shape]}}``."""
    modules = {name: [info.kind, list(info.weight_shape)] for name, info in tree.modules.items()}
    return {"format": TREE_FORMAT, "arch": tree.arch, "config": tree.unet_config, "modules": modules}


def tree_from_json(data: dict) -> ModuleTree:
    modules = {name: ModuleInfo(kind, tuple(shape)) for name, (kind, shape) in data["modules"].items()}
    return ModuleTree(data["arch"], modules, dict(data.get("config") or {}))


def write_json_atomic(path: Path, data: dict) -> None:
    """Write JSON to a temporary name beside ``path``, then rename (a crash leaves no half file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(data, handle, separators=(",", ":"))
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a tree is readable data like any package file
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@functools.lru_cache(maxsize=16)
def stored_tree(arch: str) -> ModuleTree:
    """The committed tree of a real architecture (``studio/bases/trees/<arch>.json``)."""
    return tree_from_json(json.loads((TREE_DIR / f"{arch}.json").read_text()))


def cache_dir() -> Path:
    """Where folder trees are cached (``STUDIO_CACHE_DIR``, else ``$XDG_CACHE_HOME/adapter-studio``)."""
    if os.environ.get("STUDIO_CACHE_DIR"):
        return Path(os.environ["STUDIO_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "adapter-studio"


def _version(package: str) -> str:
    try:
        return importlib_metadata.version(package)
    except importlib_metadata.PackageNotFoundError:
        return "none"


def folder_cache_key(root: Path) -> str:
    """A digest of everything a folder's tree depends on: its config files and library versions."""
    digest = hashlib.sha256(f"tree-format-{TREE_FORMAT}".encode())
    for package in ("diffusers", "transformers"):
        digest.update(f"{package}={_version(package)}".encode())
    for config in sorted(root.glob("*/config.json")) + [root / "model_index.json"]:
        digest.update(str(config.relative_to(root)).encode())
        digest.update(config.read_bytes())
    return digest.hexdigest()[:32]


def cached_folder_tree(root: Path, build) -> ModuleTree:
    """The tree of a pipeline folder from the cache, or ``build(root)`` once and cached."""
    path = cache_dir() / "trees" / f"{folder_cache_key(root)}.json"
    if path.is_file():
        try:
            return tree_from_json(json.loads(path.read_text()))
        except (OSError, ValueError, KeyError, TypeError):
            pass  # a damaged cache entry is rebuilt below and overwritten
    tree = build(root)
    try:
        write_json_atomic(path, tree_to_json(tree))
    except OSError as error:
        warnings.warn(f"module tree of {root} not cached at {path}: {error}", stacklevel=2)
    return tree
