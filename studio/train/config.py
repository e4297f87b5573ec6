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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from studio.errors import ConfigError
from studio.options import check, option

MixedPrecision = Literal["auto", "no", "fp16", "bf16"]
LrSchedule = Literal["constant", "cosine"]
ExportFormat = Literal["kohya", "diffusers", "none"]
NOT_COMPARED = ("output_dir",)  # fields a resume may change


LossWeighting = Literal["none", "min_snr", "debiased", "sampler"]
TimestepSampling = Literal["uniform", "logit_normal"]


@dataclass
class TrainConfig:
    """Everything a training run depends on; the same dataclass the app's form fills in."""

    base: str = option(help="BASE: world, sd15/sdxl folder or .safetensors checkpoint, or a hub id (online only)")
    data: str = option(help="folder of images with same-named .txt captions (kohya N_name repeat folders accepted)")
    output_dir: str = option(help="folder the run writes (config, checkpoints, samples, loss.csv, the adapter)")
    family: str = option("lora", "adapter family: lora, eigenlora, superlora, unilora")
    adapter: dict[str, Any] = option(default_factory=dict, help="the family's knobs (the [adapter] table)")
    name: str = option("", "name of the result (default: the output folder's name)")
    steps: int = option(0, "optimizer steps (0: the family's default)", minimum=0, maximum=10_000_000)
    batch_size: int = option(0, "images per step and process (0: the family's default)", minimum=0, maximum=4096)
    grad_accumulation: int = option(1, "micro-batches summed into one step", minimum=1, maximum=1024)
    learning_rate: float = option(0.0, "peak learning rate of AdamW (0: the family's default)", minimum=0, maximum=10.0)
    lr_schedule: LrSchedule = option("cosine", "constant, or cosine decay to 5% of the peak after the warm-up")
    lr_warmup_steps: int = option(0, "steps of linear warm-up", minimum=0, maximum=10_000_000)
    weight_decay: float = option(0.0, "AdamW weight decay", minimum=0, maximum=1.0)
    max_grad_norm: float = option(1.0, "clip the adapter's gradient norm to this (0: no clipping)", minimum=0)
    loss_weighting: LossWeighting = option(
        "sampler", "timestep weighting of the noise-prediction loss: none (plain MSE), min_snr (min(SNR, gamma)/SNR), "
        "debiased (1/sqrt(SNR)), sampler (max(1, 1/sqrt(SNR)): errors at high noise weigh as much as the sampler "
        "amplifies them). Flow-matching bases (FLUX.1, SD3): none and sampler are the plain mean (the flow Euler sampler "
        "adds a velocity error times the step in sigma, no amplification); min_snr and debiased are refused")
    timestep_sampling: TimestepSampling = option(
        "uniform", "flow-matching bases (FLUX.1, SD3): how training timesteps are drawn from the pipeline's own flow "
        "schedule: uniform, or logit_normal (the SD3 paper's sigmoid of a standard normal, denser mid-schedule); "
        "refused on noise-prediction bases")
    guidance: float = option(3.5, "FLUX.1-dev: the guidance embedding the transformer sees while training "
                             "(bases without one ignore it)", minimum=0, maximum=100)
    gradient_checkpointing: bool = option(False, "recompute the denoiser's activations in the backward pass "
                                          "(less activation memory for one more forward per step; for large transformer batches)")
    min_snr_gamma: float = option(5.0, "gamma of min_snr weighting", minimum=0, exclusive_minimum=True)
    max_loss_weight: float = option(0.0, "cap of the per-timestep loss weight (0: none); with sampler weighting it "
                                    "bounds how much the high-noise steps outweigh the low-noise ones, where style lives", minimum=0)
    mixed_precision: MixedPrecision = option("auto", "auto (bf16 where supported, else fp16; fp32 on CPU), no, fp16, bf16")
    seed: int = option(0, "seed of the initialisation, batches, noise and samples", minimum=0, maximum=2**63 - 1)
    resolution: int = option(0, "training side in pixels (0: the base's native size; a multiple of 8)", minimum=0, maximum=8192)
    trigger_word: str = option("", "word put before every caption (not repeated when a caption already starts with it)")
    caption_dropout: float = option(0.0, "share of training images whose caption is replaced by the empty caption (kohya's "
                                    "caption_dropout_rate): trains the unconditional branch that CFG subtracts", minimum=0, maximum=1.0)
    validation_split: float = option(0.1, "share of the pairs held out for the validation loss", minimum=0, maximum=0.9)
    validation_every: int = option(0, "steps between validation losses (0: ten times per run)", minimum=0)
    divergence_factor: float = option(1.5, "stop when the validation loss exceeds this multiple of its start twice in a row (0: never)", minimum=0)
    sample_every: int = option(0, "steps between sample images (0: none during the run)", minimum=0)
    sample_prompts: list[str] = option(default_factory=list, help="prompts of the sample images (default: the first caption)")
    sample_seeds: list[int] = option(default_factory=lambda: [0], help="seeds of the sample images")
    sample_steps: int = option(20, "denoising steps of a sample image", minimum=1, maximum=1000)
    sample_guidance: float = option(4.0, "CFG scale of the sample images", minimum=0, maximum=100)
    checkpoint_every: int = option(0, "steps between checkpoints (0: only at the end or when stopped)", minimum=0)
    keep_checkpoints: int = option(2, "checkpoints kept", minimum=1, maximum=1000)
    export_format: ExportFormat = option("kohya", "layout of the standard LoRA written at the end: kohya, diffusers, none")
    export_rank: int = option(0, "rank of the exported LoRA (0: exact where the family allows it)", minimum=0, maximum=4096)
    tensorboard: bool = option(True, "also write TensorBoard logs")

    def __post_init__(self) -> None:
        check(self, "train config")
        self._fill_family_defaults()
        if self.resolution and self.resolution % 8:
            raise ConfigError(f"train config: resolution = {self.resolution}: must be a multiple of 8")
        if self.lr_warmup_steps > self.steps:
            raise ConfigError(f"train config: lr_warmup_steps = {self.lr_warmup_steps}: must not exceed steps ({self.steps})")

    def _fill_family_defaults(self) -> None:
        """Steps, batch size and learning rate left at 0 take the family's measured defaults."""
        from studio.adapters import registry

        defaults = registry.family(self.family).defaults
        self.steps = self.steps or defaults.steps
        self.batch_size = self.batch_size or defaults.batch_size
        self.learning_rate = self.learning_rate or defaults.learning_rate

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
