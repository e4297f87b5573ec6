"""Find trainable adapter families by module, so the training loop never learns their names.

A family is a module in ``studio.adapters`` that defines

- ``FAMILY``: its name as written in configs (``"lora"``, ``"superlora"``, ...);
- ``Config``: a dataclass of its knobs (the ``[adapter]`` table of a train config);
- ``build(config, tree) -> nn.Module``: a fresh trainable adapter for a base's module tree.

The module ``build`` returns answers the adapter contract (``layers()``, ``delta(layer)``, optionally
``factors(layer)``); its trainable numbers are its ``requires_grad`` parameters. Two optional bulk
methods let families whose layers share one vector compute everything once per forward:
``deltas() -> {layer: dW}`` and ``all_factors() -> {layer: (down, up)}``.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import importlib
import pkgutil
import types
from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

import studio.adapters
from studio.bases import ModuleTree
from studio.errors import ConfigError

DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
# Families whose builder lives outside their (pure torch) module because it opens a file another
# room reads: "module:function", imported when the family is looked up.
BUILDERS = {"eigenlora": "studio.subspace.training:build"}


@dataclass(frozen=True)
class Family:
    """One discovered family: its name, config class and builder."""

    name: str
    config_class: type
    build: Callable[[Any, ModuleTree], nn.Module]
    module: types.ModuleType


def families() -> dict[str, Family]:
    """Every family module under ``studio.adapters`` (modules that fail to import are skipped)."""
    found: dict[str, Family] = {}
    for info in pkgutil.iter_modules(studio.adapters.__path__):
        module = importlib.import_module(f"studio.adapters.{info.name}")
        name = getattr(module, "FAMILY", None)
        config_class = getattr(module, "Config", None)
        build = getattr(module, "build", None)
        if build is None and name in BUILDERS:
            where, _, function = BUILDERS[name].partition(":")
            build = getattr(importlib.import_module(where), function)
        if isinstance(name, str) and dataclasses.is_dataclass(config_class) and callable(build):
            found[name] = Family(name, config_class, build, module)
    return found


def family(name: str) -> Family:
    """The family called ``name``, or a ConfigError listing the known ones."""
    known = families()
    if name not in known:
        raise ConfigError(f"adapter family {name!r} is not known; known families: {', '.join(sorted(known))}")
    return known[name]


def make_config(name: str, knobs: dict[str, Any]) -> Any:
    """Build a family's config dataclass from a TOML table, refusing unknown keys by name."""
    config_class = family(name).config_class
    fields = {f.name: f for f in dataclasses.fields(config_class)}
    unknown = sorted(set(knobs) - set(fields))
    if unknown:
        raise ConfigError(f"[adapter] family {name!r}: unknown key(s) {unknown}; known: {sorted(fields)}")
    values = {key: tuple(value) if isinstance(value, list) else value for key, value in knobs.items()}
    try:
        return config_class(**values)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"[adapter] family {name!r}: {error}") from error


def build_adapter(name: str, config: Any, tree: ModuleTree) -> nn.Module:
    """Build a trainable adapter of family ``name`` for ``tree``."""
    return family(name).build(config, tree)


def matches(layer: str, targets: tuple[str, ...]) -> bool:
    """Whether a prefixed module name matches a target: a name suffix (``to_q``) or a glob."""
    module = layer.partition(".")[2]
    for target in targets:
        if any(ch in target for ch in "*?["):
            if fnmatch.fnmatchcase(layer, target) or fnmatch.fnmatchcase(module, target):
                return True
        elif module == target or module.endswith("." + target):
            return True
    return False


def select_layers(tree: ModuleTree, targets: tuple[str, ...] = DEFAULT_TARGETS, components: tuple[str, ...] = ("unet",)) -> list[str]:
    """The targeted layers of a module tree, in the tree's order; error when nothing matches."""
    chosen = [
        name for name in tree.modules
        if name.partition(".")[0] in components and matches(name, tuple(targets))
    ]
    if not chosen:
        raise ConfigError(f"targets {list(targets)} match no layer of {list(components)} in base {tree.label}")
    return chosen


def in_features(shape: tuple[int, ...]) -> int:
    """The flattened input size of a weight (in * kh * kw for convs)."""
    size = 1
    for dim in shape[1:]:
        size *= dim
    return size
