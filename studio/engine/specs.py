"""Adapter SPEC strings and adapter names.

A SPEC is ``FILE[:weight]`` (a LoRA file), ``COLLECTION.safetensors#NAME[:weight]`` (one adapter
of a compressed collection), or ``NAME[:weight]`` for an adapter registered in an engine under
that name. Paths in specs are the CLI user's own paths (``../x.safetensors`` is fine there);
registry NAMES, which the web app takes from users, must never be paths.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from studio.errors import StudioError

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\- ]{0,127}")
WEIGHT_SUFFIX = re.compile(r"(.+):([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|[-+]?(?:inf|infinity|nan))", re.IGNORECASE)
NO_ADAPTER = "none"


class AdapterSpecError(StudioError):
    """An adapter SPEC or name is malformed, or names a file that does not exist."""


@dataclass(frozen=True)
class AdapterSpec:
    """A parsed SPEC: a file (with an optional collection member) or a registered name."""

    text: str
    target: str  # file path or registered name, as written
    member: str | None = None
    weight: float = 1.0

    @property
    def path(self) -> Path:
        return Path(self.target)

    @property
    def is_none(self) -> bool:
        return self.target.lower() == NO_ADAPTER and self.member is None


def parse_spec(text: str) -> AdapterSpec:
    """Split ``TARGET[#MEMBER][:weight]``; the weight is the part after the last ``:`` if numeric."""
    raw = text.strip()
    if not raw:
        raise AdapterSpecError("empty adapter spec")
    weight = 1.0
    match = WEIGHT_SUFFIX.fullmatch(raw)
    if match:
        raw, weight = match.group(1), float(match.group(2))
        if not math.isfinite(weight):
            raise AdapterSpecError(f"adapter spec {text!r}: the weight must be a finite number, got {match.group(2)}")
    target, hash_sign, member = raw.partition("#")
    if hash_sign and not member:
        raise AdapterSpecError(f"adapter spec {text!r}: nothing after '#' (COLLECTION.safetensors#NAME)")
    if not target:
        raise AdapterSpecError(f"adapter spec {text!r}: no file or name before '#'")
    return AdapterSpec(text, target, member or None, weight)


def check_name(name: str) -> str:
    """Accept a registry name only if it cannot be read as a path (``../``, ``/``, ``C:``...)."""
    if not isinstance(name, str) or not NAME.fullmatch(name) or ".." in name or name.strip() != name:
        raise AdapterSpecError(
            f"adapter name {name!r} is not allowed: use letters, digits, '_', '-', '.', spaces "
            "(no path separators, no '..', at most 128 characters)"
        )
    return name


def display_name(text: str) -> str:
    """A name safe for PNG tags and grid labels, made from a file stem or member name."""
    cleaned = re.sub(r"[^A-Za-z0-9_.\- ]", "_", text).strip(" .") or "adapter"
    return cleaned[:128]


def existing_file(spec: AdapterSpec) -> Path:
    """The spec's file, or a clear error naming it."""
    path = spec.path
    if not path.exists():
        raise AdapterSpecError(f"adapter spec {spec.text!r}: no such file {path}")
    if not path.is_file():
        raise AdapterSpecError(f"adapter spec {spec.text!r}: {path} is not a file")
    return path
