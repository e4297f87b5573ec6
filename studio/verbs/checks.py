"""Checks every verb shares: files and folders that must exist, outputs that must not replace an
input, collection members, device strings. Each raises a StudioError naming the field and value.

Nothing here imports torch at module level: the command line builds its parser from the requests
without it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterable

from studio.errors import ConfigError, DeviceError, PathError

MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes signed 64-bit seeds
DEVICE = re.compile(r"(cpu|mps|cuda)(:\d+)?")
SAFETENSORS = ".safetensors"


def existing_file(field: str, value: str | os.PathLike) -> Path:
    """The path of a file that must exist (a folder or a missing path is refused)."""
    path = Path(value)
    if not path.exists():
        raise PathError(f"{field}: no such file: {path}")
    if not path.is_file():
        raise PathError(f"{field}: {path} is a folder, not a file")
    return path


def existing_path(field: str, value: str | os.PathLike) -> Path:
    """A file or folder that must exist."""
    path = Path(value)
    if not path.exists():
        raise PathError(f"{field}: no such file or folder: {path}")
    return path


def existing_folder(field: str, value: str | os.PathLike) -> Path:
    """A folder that must exist."""
    path = Path(value)
    if not path.is_dir():
        raise PathError(f"{field}: no such folder: {path}" if not path.exists() else f"{field}: {path} is a file, not a folder")
    return path


def same_file(first: Path, second: Path) -> bool:
    """Whether two paths name one file (same name, a symlink or a hard link)."""
    if first.exists() and second.exists():
        return os.path.samefile(first, second)
    return first.resolve() == second.resolve()


def output_file(field: str, value: str | os.PathLike, inputs: Iterable[Path] = (), suffix: str | None = SAFETENSORS) -> Path:
    """A file to write: not a folder, with the right suffix, never one of ``inputs`` (checked
    before anything is read or written, through symlinks and hard links)."""
    path = Path(value)
    if str(value).strip() == "":
        raise PathError(f"{field}: no output file given")
    if path.is_dir() or str(value).endswith(("/", os.sep)):
        raise PathError(f"{field}: {path} is a folder; give a file name (e.g. {path / ('out' + (suffix or ''))})")
    if suffix is not None and path.suffix.lower() != suffix:
        raise PathError(f"{field}: {path} must end in {suffix}")
    if path.parent.exists() and not path.parent.is_dir():
        raise PathError(f"{field}: {path.parent} is a file, so {path.name} cannot be written inside it")
    for source in inputs:
        if same_file(Path(source), path):
            raise PathError(f"{field}: {path} would overwrite the input {source}; choose another output (nothing was written)")
    return path


def output_folder(field: str, value: str | os.PathLike) -> Path:
    """A folder to write into (made if missing); a file there is refused."""
    path = Path(value)
    if str(value).strip() == "":
        raise PathError(f"{field}: no output folder given")
    if path.exists() and not path.is_dir():
        raise PathError(f"{field}: {path} is a file, not a folder")
    return path


def split_member(text: str) -> tuple[str, str | None]:
    """``COLLECTION.safetensors#NAME`` -> (file, member); a plain path -> (path, None)."""
    target, hash_sign, member = str(text).partition("#")
    if hash_sign and not member:
        raise ConfigError(f"{text!r}: nothing after '#' (give COLLECTION.safetensors#NAME)")
    return target, member or None


def collection_member(field: str, path: Path, member: str) -> None:
    """A compressed collection file that holds ``member`` (its names listed when it does not)."""
    from studio.subspace import CompressedCollection, is_collection_file

    if not is_collection_file(path):
        raise PathError(f"{field}: {path} is not a compressed collection, so it has no member {member!r}")
    names = CompressedCollection.load(path).names
    if member not in names:
        shown = ", ".join(names[:12]) + (" ..." if len(names) > 12 else "")
        raise ConfigError(f"{field}: {path} has no adapter {member!r}; it holds {len(names)}: {shown}")


def device(field: str, value: str | None, allow_auto: bool = False) -> None:
    """A torch device this machine has: ``cpu``, ``cuda``, ``cuda:N``, ``mps`` (``auto`` where allowed)."""
    if value is None or (allow_auto and value == "auto"):
        return
    match = DEVICE.fullmatch(value)
    if not match:
        allowed = "cpu, cuda, cuda:N, mps" + (", auto" if allow_auto else "")
        raise DeviceError(f"{field}: {value!r} is not a device; use {allowed}")
    import torch

    kind, index = match.group(1), match.group(2)
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"{field}: {value!r}: CUDA is not available on this machine (use cpu)")
        if index is not None and int(index[1:]) >= torch.cuda.device_count():
            raise DeviceError(f"{field}: {value!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(f"{field}: {value!r}: MPS is not available on this machine (use cpu)")


def one_of(where: str, **values: object) -> str:
    """Exactly one of the named values is set (not None); its name."""
    given = [name for name, value in values.items() if value is not None]
    if len(given) != 1:
        names = " or ".join(values)
        raise ConfigError(f"{where}: give exactly one of {names}" + (f" (got {', '.join(given)})" if given else ""))
    return given[0]


def memory_text(size: float) -> str:
    """A byte count as people read it: GiB from 1 GiB up, else MiB (an estimate of 0.0 GiB says nothing)."""
    return f"{size / 2**30:.1f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB"
