"""The table of trainable adapter families: name -> config class, builder, training defaults.

A family is one module (pure torch): a ``Config`` dataclass of its knobs (fields declared with
``studio.options.option``, so the CLI, the app and recipes show the same help) and
``build(config, tree) -> nn.Module`` returning a fresh trainable adapter that answers the
adapter contract (``layers()``, ``delta(layer)``, optionally ``factors(layer)``). Families are
registered here explicitly, as peft's ``register_peft_method`` does; nothing is found by scanning.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

from studio.adapters import eigenlora, lora_train, superlora, unilora
from studio.adapters.layers import DEFAULT_TARGETS, in_features, matches, select_layers
from studio.bases import ModuleTree
from studio.errors import ConfigError, StudioError
from studio.options import check

__all__ = ["DEFAULT_TARGETS", "Family", "TrainingDefaults", "build_adapter", "families", "family", "in_features",
           "make_config", "matches", "register_family", "select_layers"]


@dataclass(frozen=True)
class TrainingDefaults:
    """Settings measured to give a good adapter of the family on the embedded world
    (BENCHMARKS.md, training quality); the app's form and `studio train` start from them."""

    learning_rate: float
    batch_size: int = 8
    steps: int = 300


@dataclass(frozen=True)
class Family:
    """One registered family."""

    name: str
    config_class: type
    build: Callable[[Any, ModuleTree], nn.Module]
    defaults: TrainingDefaults
    summary: str = ""


_FAMILIES: dict[str, Family] = {}


def register_family(name: str, config_class: type, build: Callable[[Any, ModuleTree], nn.Module],
                    defaults: TrainingDefaults, summary: str = "") -> Family:
    """Add a family to the table (a name registered twice is an error)."""
    if name in _FAMILIES:
        raise StudioError(f"adapter family {name!r} is registered twice")
    if not dataclasses.is_dataclass(config_class):
        raise StudioError(f"adapter family {name!r}: its config must be a dataclass")
    _FAMILIES[name] = Family(name, config_class, build, defaults, summary)
    return _FAMILIES[name]


register_family("lora", lora_train.Config, lora_train.build, TrainingDefaults(learning_rate=2e-3),
                "plain LoRA: A and B per layer")
def _late(target: str) -> Callable[[Any, ModuleTree], nn.Module]:
    """A builder named "module:function", imported when first called: the eigenlora builder opens a
    collection file, which is the subspace room's job (the family module itself stays pure torch)."""
    def build(config: Any, tree: ModuleTree) -> nn.Module:
        module, _, function = target.partition(":")
        return getattr(importlib.import_module(module), function)(config, tree)
    return build


register_family("eigenlora", eigenlora.Config, _late("studio.subspace.training:build"), TrainingDefaults(learning_rate=3e-3),
                "EigenLoRAx: only the loadings against a compressed collection's components train")
register_family("superlora", superlora.Config, superlora.build, TrainingDefaults(learning_rate=1e-2),
                "SuperLoRA: grouped / Kronecker / Tucker factors shared across layers")
register_family("unilora", unilora.Config, unilora.build, TrainingDefaults(learning_rate=2e-2),
                "Uni-LoRA: one d-vector spread over all layers by a fixed seeded projection")


def families() -> dict[str, Family]:
    """Every registered family by name."""
    return dict(_FAMILIES)


def family(name: str) -> Family:
    """The family called ``name``, or a ConfigError listing the known ones."""
    if name not in _FAMILIES:
        raise ConfigError(f"adapter family {name!r} is not known; known families: {', '.join(sorted(_FAMILIES))}")
    return _FAMILIES[name]


def make_config(name: str, knobs: dict[str, Any]) -> Any:
    """Build a family's config dataclass from a TOML table, refusing unknown keys and bad values by name."""
    config_class = family(name).config_class
    fields = {f.name: f for f in dataclasses.fields(config_class)}
    unknown = sorted(set(knobs) - set(fields))
    if unknown:
        raise ConfigError(f"[adapter] family {name!r}: unknown key(s) {unknown}; known: {sorted(fields)}")
    values = {key: tuple(value) if isinstance(value, list) else value for key, value in knobs.items()}
    try:
        config = config_class(**values)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"[adapter] family {name!r}: {error}") from error
    check(config, f"[adapter] family {name!r}")
    return config


def build_adapter(name: str, config: Any, tree: ModuleTree) -> nn.Module:
    """Build a trainable adapter of family ``name`` for ``tree``."""
    return family(name).build(config, tree)
