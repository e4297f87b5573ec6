"""Styles are data: a named list of transform steps plus a trigger word, read from TOML.

A style file looks like::

    [[style]]
    name = "poster"
    trigger = "posterly"          # one lowercase word; captions of this style start with it
    steps = [{ op = "posterize", levels = 3 }, { op = "frame", width = 3, colour = "black" }]

Anyone can add a style by adding a table; the steps are the ones in ``transforms.STEPS``.
Errors name the file, the style and the step.
"""

from __future__ import annotations

import hashlib
import inspect
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from studio.errors import ConfigError
from studio.world.transforms import STEPS

DEFAULT_STYLES = Path(__file__).with_name("styles.toml")
TRIGGER = re.compile(r"^[a-z]{3,24}$")


@dataclass(frozen=True)
class StyleStep:
    """One transform step: its op name and keyword parameters."""

    op: str
    params: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Style:
    """A named style: trigger word, steps, and a description for people."""

    name: str
    trigger: str
    steps: tuple[StyleStep, ...]
    description: str = ""

    def seed(self, seed: int) -> int:
        """A per-style seed derived from a global one (stable across runs and machines)."""
        digest = hashlib.sha256(f"{self.name}:{seed}".encode()).digest()
        return int.from_bytes(digest[:4], "little")

    def apply(self, images: Tensor, seed: int = 0) -> Tensor:
        """Apply the steps to a uint8 batch (N, 3, H, W); returns uint8 of the same shape."""
        gen = torch.Generator(device="cpu").manual_seed(self.seed(seed))
        x = images.float() / 255.0
        for s in self.steps:
            x = STEPS[s.op](x, gen, **s.params)
        return (x.clamp(0, 1) * 255).round().to(torch.uint8)

    def caption(self, caption: str) -> str:
        """The caption of a styled image: the trigger word first."""
        return f"{self.trigger} style, {caption}"


def load_styles(path: str | Path = DEFAULT_STYLES) -> list[Style]:
    """Read and validate every ``[[style]]`` table of a TOML file."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: style file not found") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: invalid TOML: {error}") from None
    tables = data.get("style", [])
    if not isinstance(tables, list) or not tables:
        raise ConfigError(f"{path}: no [[style]] tables")
    styles = [_parse_style(path, i, table) for i, table in enumerate(tables)]
    _check_unique(path, styles)
    return styles


def _parse_style(path: Path, index: int, table: dict) -> Style:
    where = f"{path}: style #{index + 1}"
    name = table.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[a-z0-9_\-]{1,40}", name):
        raise ConfigError(f"{where}: 'name' must be a short lowercase name (letters, digits, _ -), got {name!r}")
    where = f"{path}: style {name!r}"
    trigger = table.get("trigger")
    if not isinstance(trigger, str) or not TRIGGER.match(trigger):
        raise ConfigError(f"{where}: 'trigger' must be one lowercase word of 3-24 letters, got {trigger!r}")
    unknown = set(table) - {"name", "trigger", "steps", "description"}
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)}")
    steps = table.get("steps")
    if not isinstance(steps, list) or not steps:
        raise ConfigError(f"{where}: 'steps' must be a non-empty list of {{ op = ..., ... }} tables")
    parsed = tuple(_parse_step(where, j, s) for j, s in enumerate(steps))
    style = Style(name, trigger, parsed, str(table.get("description", "")))
    _dry_run(where, style)
    return style


def _parse_step(where: str, index: int, table: dict) -> StyleStep:
    if not isinstance(table, dict) or "op" not in table:
        raise ConfigError(f"{where}: step #{index + 1} needs an 'op' (one of {', '.join(sorted(STEPS))})")
    params = {k: v for k, v in table.items() if k != "op"}
    op = table["op"]
    if op not in STEPS:
        raise ConfigError(f"{where}: step #{index + 1}: unknown op {op!r}; known ops: {', '.join(sorted(STEPS))}")
    allowed = [p for p in inspect.signature(STEPS[op]).parameters if p not in ("images", "gen")]
    bad = sorted(set(params) - set(allowed))
    if bad:
        raise ConfigError(f"{where}: step #{index + 1} ({op}): unknown parameters {bad}; allowed: {allowed}")
    return StyleStep(op, params)


def _dry_run(where: str, style: Style) -> None:
    """Apply the style to a tiny batch so bad parameter values fail at load time, not mid-build."""
    try:
        style.apply(torch.zeros(1, 3, 16, 16, dtype=torch.uint8))
    except (ValueError, TypeError, RuntimeError) as error:
        raise ConfigError(f"{where}: {error}") from None


def _check_unique(path: Path, styles: list[Style]) -> None:
    for attr in ("name", "trigger"):
        seen: set[str] = set()
        for style in styles:
            value = getattr(style, attr)
            if value in seen:
                raise ConfigError(f"{path}: two styles share the {attr} {value!r}")
            seen.add(value)
