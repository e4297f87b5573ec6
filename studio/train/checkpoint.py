"""Checkpoints as safetensors + JSON (never pickle), written atomically, the last good ones kept.

A checkpoint is a folder ``checkpoints/step-000050/`` with ``adapter.safetensors`` (trainable
parameters), ``optimizer.safetensors`` (state tensors; the structure as JSON in its header) and
``state.json`` (step, lr schedule, RNG states as lists). It is written under a temporary name and
renamed into place; ``checkpoints/latest`` (written atomically last) names the last good one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
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
    tmp = Path(tempfile.mkdtemp(prefix=f".step-{step:06d}.", dir=folder))
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
