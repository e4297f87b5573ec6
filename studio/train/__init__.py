"""One training loop for every adapter family: ``train(config) -> Iterator[Event]`` ending with Done.

The names below are imported on first use, so that reading a `TrainConfig` (the CLI's ``--help``,
a recipe) does not load torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "Export": "studio.train.export", "to_lora": "studio.train.export", "TrainConfig": "studio.train.config",
    "load_config": ("studio.train.config", "load"), "TrainResult": "studio.train.loop", "train": "studio.train.loop",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module 'studio.train' has no attribute {name!r}")
    module, attribute = where if isinstance(where, tuple) else (where, name)
    return getattr(importlib.import_module(module), attribute)
