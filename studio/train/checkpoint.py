"""Checkpoints as safetensors + JSON (never pickle), written atomically, the last good ones kept.

A checkpoint is a folder ``checkpoints/step-000050/`` with ``adapter.safetensors`` (trainable
parameters), ``optimizer.safetensors`` (state tensors; the structure as JSON in its header) and
``state.json`` (step, lr schedule, RNG states as lists). It is written under a temporary name and
renamed into place; ``checkpoints/latest`` (written atomically last) names the last good one.
Folders are made with ``os.mkdir`` and files through ``studio.fileio`` (modes from the umask,
not mkdtemp's 0700 / mkstemp's 0600). A run killed mid-write leaves a ``.step-*`` folder or a
``.NAME.*.tmp`` file behind; ``clean_leftovers`` removes them when the next run or resume starts.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from studio.errors import ConfigError
from studio.fileio import save_safetensors, write_text


def adapter_tensors(adapter: nn.Module) -> dict[str, Tensor]:
    """The trainable parameters by name (what a checkpoint and the result file store)."""
    return {name: p.detach() for name, p in adapter.named_parameters() if p.requires_grad}


def load_adapter_tensors(adapter: nn.Module, tensors: dict[str, Tensor], where: str) -> None:
    """Copy saved trainable parameters into ``adapter``, refusing missing or misshapen ones."""
    params = dict(adapter.named_parameters())
    for name, p in params.items():
        if not p.requires_grad:
            continue
        if name not in tensors or tensors[name].shape != p.shape:
            got = tuple(tensors[name].shape) if name in tensors else "missing"
            raise ConfigError(f"{where}: parameter {name!r} does not fit (expected {tuple(p.shape)}, got {got})")
        with torch.no_grad():
            p.copy_(tensors[name].to(p.device, p.dtype))


def optimizer_tensors(state: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Split an optimizer state_dict into tensors and a JSON structure."""
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, values in state["state"].items():
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{key}"] = value
            else:
                scalars.setdefault(str(pid), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def optimizer_state(tensors: dict[str, Tensor], structure: dict[str, Any]) -> dict[str, Any]:
    """Rebuild an optimizer state_dict from ``optimizer_tensors``' output."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        pid, _, name = key.partition(".")
        state.setdefault(int(pid), {})[name] = value
    for pid, values in structure["scalars"].items():
        state.setdefault(int(pid), {}).update(values)
    return {"state": state, "param_groups": structure["param_groups"]}


def rng_state() -> dict[str, list[int]]:
    """Torch RNG states (CPU and every CUDA device) as JSON-able byte lists."""
    states = {"cpu": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        states.update({f"cuda{i}": s.tolist() for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return states


def set_rng_state(states: dict[str, list[int]]) -> None:
    torch.set_rng_state(torch.tensor(states["cpu"], dtype=torch.uint8))
    cuda = [torch.tensor(states[k], dtype=torch.uint8) for k in sorted(states) if k.startswith("cuda")]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def save(folder: Path, step: int, adapter: nn.Module, optimizer: Any, scheduler: Any, extra: dict[str, Any], keep: int) -> Path:
    """Write checkpoint ``step`` atomically, point ``latest`` at it, prune older ones."""
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step-{step:06d}"
    tmp = folder / f".step-{step:06d}.{os.getpid()}-{secrets.token_hex(4)}"
    os.mkdir(tmp)  # mode 0777 & ~umask, like the folders around it
    try:
        save_safetensors(adapter_tensors(adapter), tmp / "adapter.safetensors")
        tensors, structure = optimizer_tensors(optimizer.state_dict())
        save_safetensors(tensors, tmp / "optimizer.safetensors", {"structure": json.dumps(structure)})
        state = {"step": step, "scheduler": scheduler.state_dict(), "rng": rng_state(), **extra}
        write_text(tmp / "state.json", json.dumps(state))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    write_text(folder / "latest", final.name)
    _prune(folder, keep)
    return final


TEMP_FOLDER = re.compile(r"^\.step-\d{6}\.")  # a checkpoint being written (see ``save``)
TEMP_FILE = re.compile(r"^\..+\.[A-Za-z0-9_]+\.tmp$")  # studio.fileio.atomic_path's ".NAME.XXXX.tmp"
RUN_SUBFOLDERS = ("checkpoints", "best", "samples")


def clean_leftovers(out: Path) -> list[Path]:
    """Remove what a killed run left half-written in its output folder; return what was removed.

    Only the studio's own temporary names are touched: ``.step-NNNNNN.*`` folders in
    ``checkpoints/`` and ``.NAME.*.tmp`` files (atomic writes) in the run folder and its
    checkpoints / best / samples folders. Finished outputs are never touched.
    """
    removed: list[Path] = []
    for folder in (out, *(out / name for name in RUN_SUBFOLDERS)):
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            if path.is_dir() and not path.is_symlink() and folder.name == "checkpoints" and TEMP_FOLDER.match(path.name):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
            elif path.is_file() and TEMP_FILE.match(path.name):
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed


def _prune(folder: Path, keep: int) -> None:
    steps = sorted(p for p in folder.glob("step-*") if p.is_dir())
    for old in steps[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def latest(folder: Path) -> Path | None:
    """The last good checkpoint folder, or None."""
    pointer = folder / "latest"
    if not pointer.exists():
        return None
    path = folder / pointer.read_text(encoding="utf-8").strip()
    return path if (path / "state.json").exists() else None


def load(path: Path, adapter: nn.Module, optimizer: Any, scheduler: Any) -> dict[str, Any]:
    """Restore adapter, optimizer, scheduler and RNG from a checkpoint; return its state.json."""
    state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    load_adapter_tensors(adapter, load_file(str(path / "adapter.safetensors")), str(path))
    from safetensors import safe_open

    with safe_open(str(path / "optimizer.safetensors"), "pt") as handle:
        structure = json.loads(handle.metadata()["structure"])
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    optimizer.load_state_dict(optimizer_state(tensors, structure))
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return state
