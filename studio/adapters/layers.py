"""Which layers of a base an adapter targets: name matching on a module tree, flattened sizes."""

from __future__ import annotations

import fnmatch

from studio.bases import ModuleTree
from studio.errors import ConfigError

DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


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
    """The targeted layers of a module tree, in the tree's order; error when nothing matches.

    Text-encoder components also take CLIP's attention projections (q/k/v/out_proj), so a
    target list written for the UNet ("to_q", ...) trains the text encoders' attention too."""
    chosen = []
    for name in tree.modules:
        component = name.partition(".")[0]
        if component not in components:
            continue
        wanted = tuple(targets) + (TEXT_ENCODER_TARGETS if component.startswith("text_encoder") else ())
        if matches(name, wanted):
            chosen.append(name)
    if not chosen:
        raise ConfigError(f"targets {list(targets)} match no layer of {list(components)} in base {tree.label}")
    missing = [c for c in components if not any(name.startswith(c + ".") for name in chosen)]
    if missing:
        raise ConfigError(f"targets {list(targets)} match no layer of {missing} in base {tree.label} (it has "
                          f"{', '.join(sorted({n.partition('.')[0] for n in tree.modules}))})")
    return chosen


def in_features(shape: tuple[int, ...]) -> int:
    """The flattened input size of a weight (in * kh * kw for convs)."""
    size = 1
    for dim in shape[1:]:
        size *= dim
    return size
