"""The studio's own trained-adapter files (``adapter.safetensors`` of a run, ``best/adapter.safetensors``),
read back as live adapters of their family, and turned into standard LoRAs.

A native file holds the family's trainable parameters (read with the studio's capped safetensors
reader, never pickle) and, in its header, the family, its knobs and the base it was trained on
(``studio.format = trained-adapter/1``). Reading one rebuilds the family's adapter for that base
(or another base with the same module tree) and loads the parameters; every family is exact
there, and families with low-rank factors also export to a LoRA exactly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from studio.errors import ConfigError, FormatError, StudioError

NATIVE_FORMAT = "trained-adapter/1"


@dataclass
class NativeAdapter:
    """A native file read back: the live adapter (its family's module) and what its header says."""

    path: Path
    family: str
    knobs: dict[str, Any]
    base: str
    adapter: nn.Module
    metadata: dict[str, str]

    @property
    def name(self) -> str:
        """The run's name; its best checkpoint is ``NAME-best`` (both can sit in one collection)."""
        name = self.metadata.get("ss_output_name") or self.path.parent.name or self.path.stem
        return f"{name}-best" if "studio.best_step" in self.metadata else name


def is_native(metadata: dict[str, str]) -> bool:
    """Whether a safetensors header is a studio-trained adapter file."""
    return metadata.get("studio.format") == NATIVE_FORMAT


def load_native(path: str | Path, base: str | None = None) -> NativeAdapter:
    """Rebuild the adapter a native file holds, for ``base`` (a BASE string or a module tree;
    default: the base it was trained on)."""
    from studio.adapters import registry
    from studio.bases import module_tree
    from studio.formats import safe_load
    from studio.train.checkpoint import load_adapter_tensors

    path = Path(path)
    tensors, metadata = safe_load(path)
    if not is_native(metadata):
        raise FormatError(f"{path}: not a studio-trained adapter file (no studio.format = {NATIVE_FORMAT} in its header)")
    family = metadata.get("studio.family", "")
    try:
        knobs = json.loads(metadata.get("studio.adapter", "{}"))
    except json.JSONDecodeError as error:
        raise FormatError(f"{path}: header field studio.adapter is not JSON ({error})") from error
    base = base or metadata.get("studio.base", "")
    if not base:
        raise FormatError(f"{path}: the header names no base (studio.base); give --base")
    try:
        tree = module_tree(base) if isinstance(base, str) else base
        adapter = registry.build_adapter(family, registry.make_config(family, knobs), tree)
    except StudioError as error:
        raise ConfigError(f"{path}: cannot rebuild its {family!r} adapter for base {base!r}: {error}") from error
    load_adapter_tensors(adapter, tensors, str(path))
    return NativeAdapter(path, family, knobs, base if isinstance(base, str) else tree.label, adapter.eval().requires_grad_(False), metadata)


def native_to_lora(path: str | Path, base=None, rank: int = 0):
    """A native file as a standard LoRA (``studio.train.export.Export``: the LoRA and its error)."""
    from studio.bases import module_tree
    from studio.train.export import to_lora

    native = load_native(path, base)
    tree = base if base is not None and not isinstance(base, str) else module_tree(native.base)
    metadata = {k: v for k, v in native.metadata.items() if not k.startswith("studio.") or k in KEPT_FIELDS}
    if "modelspec.trigger_phrase" not in metadata and native.metadata.get("studio.trigger_word"):
        metadata["modelspec.trigger_phrase"] = native.metadata["studio.trigger_word"]
    export = to_lora(native.adapter, rank, native.name, tree, metadata)
    export.adapter.base_arch = tree.arch
    export.adapter.source_format = "studio"
    export.adapter.notes.insert(0, _read_note(native, export))
    return export


KEPT_FIELDS = ("studio.family", "studio.status", "studio.steps", "studio.trigger_word", "studio.best_step", "studio.best_validation")


def _read_note(native: NativeAdapter, export) -> str:
    """Which run and checkpoint the LoRA comes from and what reading it as a LoRA cost (a
    ``warning: `` note above the 1% target)."""
    from studio.train.export import TARGET

    meta = native.metadata
    when = (f"best checkpoint: step {meta['studio.best_step']}, validation loss {meta.get('studio.best_validation', '?')}"
            if "studio.best_step" in meta else f"{meta.get('studio.status', 'done')} after {meta.get('studio.steps', '?')} steps")
    level = "warning: " if export.relative_error > TARGET else ""
    return f"{level}a studio-trained {native.family} adapter ({when}), read as a LoRA {export.how}"


def read_as_lora(path: Path, base=None, name: str | None = None):
    """What the formats room calls for a native file: the adapter as a LoraAdapter, its source and
    faithfulness in the notes (exact for families with low-rank factors, else the 1% target)."""
    lora = native_to_lora(path, base).adapter
    if name:
        lora.name = name
    return lora
