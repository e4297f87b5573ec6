"""bytes <-> `LoraAdapter`: safe safetensors reading, every key scheme, metadata carried over.

The names below are imported on first use (PEP 562), so that a torch-free submodule (``keys``,
``configs``, the header reader in ``safe``) can be imported without the torch-bound reader and
writer: `studio inspect` reads plain LoRA files from their headers without importing torch."""

from __future__ import annotations

import importlib

_EXPORTS = {
    "load_adapter": "studio.formats.reader", "read_header": "studio.formats.safe", "safe_load": "studio.formats.safe",
    "shown_metadata": "studio.formats.safe", "ToolExport": "studio.formats.tools", "export_for": "studio.formats.tools",
    "save_adapter": "studio.formats.writer",
}

__all__ = ["ToolExport", "export_for", "load_adapter", "read_header", "safe_load", "save_adapter", "shown_metadata"]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'studio.formats' has no attribute {name!r}")
