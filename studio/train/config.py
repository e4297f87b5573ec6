"""The typed train config, read from and written to TOML; the diff that guards a resume.

```toml
base = "world"                 # BASE: world, a diffusers folder, a .safetensors file, a hub id
data = "data/style"            # images + same-named .txt captions (kohya N_name folders accepted)
output_dir = "runs/style-lora"
steps = 400
learning_rate = 1e-4

[adapter]                      # the family and its knobs (see studio.adapters.<family>.Config)
family = "lora"
rank = 8
alpha = 8
```
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from studio.errors import ConfigError

MixedPrecision = Literal["auto", "no", "fp16", "bf16"]
LrSchedule = Literal["constant", "cosine"]
ExportFormat = Literal["kohya", "diffusers", "none"]
NOT_COMPARED = ("output_dir",)  # fields a resume may change


@dataclass
class TrainConfig:
    """Everything a training run depends on; the same dataclass the app's form fills in."""

    base: str
    data: str
    output_dir: str
    family: str = "lora"
    adapter: dict[str, Any] = field(default_factory=dict)
    name: str = ""
    steps: int = 500
    batch_size: int = 1
    grad_accumulation: int = 1
    learning_rate: float = 1e-4
    lr_schedule: LrSchedule = "constant"
    lr_warmup_steps: int = 0
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    mixed_precision: MixedPrecision = "auto"
    seed: int = 0
    resolution: int = 0
    trigger_word: str = ""
    validation_split: float = 0.0
    validation_every: int = 0
    sample_every: int = 0
    sample_prompts: list[str] = field(default_factory=list)
    sample_seeds: list[int] = field(default_factory=lambda: [0])
    sample_steps: int = 20
    sample_guidance: float = 5.0
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    export_format: ExportFormat = "kohya"
    export_rank: int = 0
    tensorboard: bool = True

    def __post_init__(self) -> None:
        checks = {
            "steps": self.steps >= 1, "batch_size": self.batch_size >= 1,
            "grad_accumulation": self.grad_accumulation >= 1, "learning_rate": self.learning_rate > 0,
            "validation_split": 0 <= self.validation_split < 1, "keep_checkpoints": self.keep_checkpoints >= 1,
            "mixed_precision": self.mixed_precision in ("auto", "no", "fp16", "bf16"),
            "lr_schedule": self.lr_schedule in ("constant", "cosine"),
            "export_format": self.export_format in ("kohya", "diffusers", "none"),
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ConfigError(f"train config: invalid value for {', '.join(bad)}: " + ", ".join(f"{b}={getattr(self, b)!r}" for b in bad))

    @property
    def run_name(self) -> str:
        return self.name or Path(self.output_dir).name or "adapter"

    def to_dict(self) -> dict[str, Any]:
        """Plain values; the adapter table carries its family."""
        values = dataclasses.asdict(self)
        values["adapter"] = {"family": values.pop("family"), **values["adapter"]}
        return values


def from_dict(values: dict[str, Any], where: str = "train config") -> TrainConfig:
    """Build a TrainConfig from parsed TOML, naming unknown or missing keys."""
    values = dict(values)
    adapter = dict(values.pop("adapter", {}))
    values["family"] = adapter.pop("family", values.get("family", "lora"))
    values["adapter"] = adapter
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}")
    missing = [name for name in ("base", "data", "output_dir") if name not in values]
    if missing:
        raise ConfigError(f"{where}: missing required key(s) {missing}")
    try:
        return TrainConfig(**values)
    except TypeError as error:
        raise ConfigError(f"{where}: {error}") from error


def _read(path: Path) -> dict[str, Any]:
    try:
        values = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: cannot read train config: {error}") from error
    values.pop("job", None)  # the same file may be a `studio run` recipe ([job] kind = "train")
    return values


def load(path: str | Path) -> TrainConfig:
    """Read a train config TOML file (one run)."""
    path = Path(path)
    values = _read(path)
    if "runs" in values:
        raise ConfigError(f"{path}: holds several [[runs]]; give a single-run config")
    return from_dict(values, str(path))


def load_runs(path: str | Path) -> list[TrainConfig]:
    """One config, or one per ``[[runs]]`` entry (each entry overrides the shared top-level keys)."""
    path = Path(path)
    values = _read(path)
    runs = values.pop("runs", None)
    if runs is None:
        return [from_dict(values, str(path))]
    configs = []
    for i, run in enumerate(runs):
        merged = {**values, **run, "adapter": {**values.get("adapter", {}), **run.get("adapter", {})}}
        configs.append(from_dict(merged, f"{path} [[runs]] #{i + 1}"))
    return configs


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise ConfigError(f"cannot write {value!r} to TOML")


def dumps(config: TrainConfig) -> str:
    """The config as TOML text (top-level keys, then the [adapter] table)."""
    values = config.to_dict()
    adapter = values.pop("adapter")
    lines = [f"{key} = {_toml_value(value)}" for key, value in values.items()]
    lines += ["", "[adapter]"] + [f"{key} = {_toml_value(value)}" for key, value in adapter.items()]
    return "\n".join(lines) + "\n"


def diff(old: TrainConfig, new: TrainConfig) -> list[str]:
    """Lines ``key: old -> new`` for every compared field that differs."""
    before, after = _flat(old.to_dict()), _flat(new.to_dict())
    keys = sorted((set(before) | set(after)) - set(NOT_COMPARED))
    return [f"{key}: {before.get(key, '<unset>')!r} -> {after.get(key, '<unset>')!r}" for key in keys if before.get(key) != after.get(key)]


def _flat(values: dict[str, Any]) -> dict[str, Any]:
    flat = {key: value for key, value in values.items() if key != "adapter"}
    flat.update({f"adapter.{key}": list(v) if isinstance(v, tuple) else v for key, v in values["adapter"].items()})
    return flat
