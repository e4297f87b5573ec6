"""The training runs in a folder, as a user picks them: what each is, how far it got, what it left.

A run folder is what ``studio train`` writes: ``config.toml``, ``checkpoints/``, ``loss.csv``,
``samples/``, ``best/adapter.safetensors`` and, at the end, ``adapter.safetensors`` plus the
exported ``NAME.lora.safetensors``. The app's resume picker, its loss plot after a restart and
``studio export RUN --checkpoint best`` read them through here.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from studio.errors import ConfigError

RunStatus = Literal["done", "stopped", "diverged", "running or cut off", "not started"]


@dataclass
class RunInfo:
    """One run folder, read without loading any model."""

    name: str
    folder: Path
    status: RunStatus
    family: str
    steps_done: int
    steps_total: int
    best_step: int | None = None
    best_validation: float | None = None
    lora_path: Path | None = None
    adapter_path: Path | None = None
    best_path: Path | None = None
    samples: list[Path] = field(default_factory=list)

    @property
    def resumable(self) -> bool:
        return self.status in ("stopped", "running or cut off") and (self.folder / "checkpoints" / "latest").exists()

    def as_json(self) -> dict:
        return {
            "name": self.name, "folder": str(self.folder), "status": self.status, "family": self.family,
            "steps": f"{self.steps_done}/{self.steps_total}", "best_step": self.best_step,
            "best_validation": self.best_validation, "resumable": self.resumable,
            "lora": str(self.lora_path) if self.lora_path else None, "samples": len(self.samples),
        }


def loss_history(folder: str | Path) -> dict[str, dict[int, float]]:
    """{"loss": {step: value}, "val_loss": {step: value}} from a run's loss.csv (empty when absent)."""
    path = Path(folder) / "loss.csv"
    history: dict[str, dict[int, float]] = {"loss": {}, "val_loss": {}}
    if not path.exists():
        return history
    with path.open(newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            for key in history:
                if row.get(key):
                    history[key][int(row["step"])] = float(row[key])
    return history


def run_info(folder: str | Path) -> RunInfo:
    """What a run folder holds; ConfigError when it is not one."""
    from studio.formats import read_header
    from studio.train import checkpoint
    from studio.train.config import load

    folder = Path(folder)
    if not (folder / "config.toml").exists():
        raise ConfigError(f"{folder}: not a training run (no config.toml)")
    config = load(folder / "config.toml")
    history = loss_history(folder)
    done = max(history["loss"], default=0)
    adapter = folder / "adapter.safetensors"
    status: RunStatus = "not started" if not done else "running or cut off"
    if adapter.exists():
        status = read_header(adapter)[1].get("studio.status", "done")  # type: ignore[assignment]
    elif checkpoint.latest(folder / "checkpoints") is not None:
        status = "stopped"
    best = folder / "best" / "adapter.safetensors"
    best_meta = read_header(best)[1] if best.exists() else {}
    lora = folder / f"{config.run_name}.lora.safetensors"
    return RunInfo(
        folder.name, folder, status, config.family, done, config.steps,
        int(best_meta["studio.best_step"]) if "studio.best_step" in best_meta else None,
        float(best_meta["studio.best_validation"]) if "studio.best_validation" in best_meta else None,
        lora if lora.exists() else None, adapter if adapter.exists() else None, best if best.exists() else None,
        sorted((folder / "samples").glob("*.png")) if (folder / "samples").is_dir() else [],
    )


def list_runs(folder: str | Path) -> list[RunInfo]:
    """Every run directly inside ``folder`` (newest first); folders that are not runs are left out."""
    root = Path(folder)
    if not root.is_dir():
        return []
    runs = [run_info(child) for child in root.iterdir() if (child / "config.toml").exists()]
    return sorted(runs, key=lambda run: (run.folder / "config.toml").stat().st_mtime, reverse=True)
