"""`studio train CONFIG.toml [--resume DIR] [--steps N --learning-rate LR ...]`: train an adapter
of any family on a folder of captioned images, through the one loop (`studio.train.train`).

Every field of `studio.train.config.TrainConfig` can be overridden (on the command line one flag
per field, in a recipe a key of the ``[train]`` table); the ``[adapter]`` knobs are checked by the
family's own config (`studio.adapters.registry.make_config`) before any model loads. A config
with several ``[[runs]]`` trains each in turn and the result prints the quality table. Under
`accelerate launch` / `torchrun` accelerate joins the process group; only rank 0 prints.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from studio.errors import ConfigError, LimitError, PathError, StudioError
from studio.events import Done, Event
from studio.options import check as check_fields
from studio.options import Cli, option
from studio.train.config import TrainConfig
from studio.verbs import checks
from studio.verbs.result import VerbResult

MAX_THREADS = 1024
FAITHFUL = 0.01  # an export error above this is a warning with its number (the project's rule)
BYTES_PER_TRAINABLE = 16  # fp32 weight, its gradient and AdamW's two moments


@dataclass
class TrainRequest:
    """Which config, resumed or not, with which fields overridden."""

    config: str = option(help="train config TOML (see studio/train/config.py; several [[runs]] train in turn)",
                         cli=Cli(positional=True, metavar="CONFIG.toml"))
    resume: str | None = option(None, "continue the run in DIR (its saved config must match)", cli=Cli(metavar="DIR"))
    threads: int | None = option(None, "CPU threads for torch (default: torch's own)", minimum=1, maximum=MAX_THREADS)
    overrides: dict[str, Any] = option(default_factory=dict, cli=False,
                                       help="TrainConfig fields replacing the config file's values")


@dataclass
class RunOutcome:
    """One trained run: its config, the loop's `TrainResult`, the wall time."""

    config: TrainConfig
    result: Any  # studio.train.TrainResult
    seconds: float


@dataclass
class TrainOutcome(VerbResult):
    """Every run of the config (one, or one per ``[[runs]]``)."""

    runs: list[RunOutcome]
    warnings: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        """0 when every run finished, 1 when one stopped or diverged."""
        return 0 if all(run.result.status == "done" for run in self.runs) else 1

    def as_json(self) -> list[dict]:
        return [{"run": run.config.run_name, "family": run.config.family, "status": run.result.status, "steps": run.result.steps,
                 "adapter": str(run.result.adapter_path) if run.result.adapter_path else None,
                 "lora": str(run.result.lora_path) if run.result.lora_path else None, "parameters": run.result.parameters,
                 "validation": {str(k): v for k, v in run.result.validation.items()}, "export_error": run.result.export_error,
                 "seconds": run.seconds} for run in self.runs]

    def as_text(self) -> str:
        lines = [f"{run.config.run_name}: {run.result.status} after {run.result.steps} steps -> {run.result.adapter_path}" for run in self.runs]
        if len(self.runs) > 1:
            lines += ["", quality_table(self.runs)]
        return "\n".join(lines)


def quality_table(runs: list[RunOutcome]) -> str:
    """One line per run: family, trainable numbers, validation loss first -> last, export error, time."""
    lines = [f"{'run':<24} {'family':<10} {'params':>10} {'val@0':>8} {'val@end':>8} {'drop':>7} {'export err':>10} {'time s':>7}"]
    for run in runs:
        result = run.result
        first, last = result.validation.get(0, float("nan")), result.validation.get(result.steps, float("nan"))
        error = "-" if result.export_error is None else f"{result.export_error:.4f}"
        drop = (first - last) / first if first else float("nan")
        lines.append(f"{run.config.run_name:<24} {run.config.family:<10} {result.parameters:>10,} {first:>8.4f} {last:>8.4f} "
                     f"{drop:>7.2%} {error:>10} {run.seconds:>7.1f}")
    return "\n".join(lines)


def configs_of(request: TrainRequest) -> list[TrainConfig]:
    """The config file's runs with the overrides applied (each checked by TrainConfig itself)."""
    from studio.train.config import load_runs

    configs = load_runs(checks.existing_file("config", request.config))
    if not request.overrides:
        return configs
    known = {item.name for item in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(request.overrides) - known)
    if unknown:
        raise ConfigError(f"train: unknown config field(s) {unknown}")
    try:
        return [dataclasses.replace(config, **request.overrides) for config in configs]
    except TypeError as error:
        raise ConfigError(f"train: {error}") from error


def check(request: TrainRequest) -> list[TrainConfig]:
    """Every field, every run's config and family knobs, the data folders and the resumed run."""
    check_fields(request, "train")
    if request.resume is not None:
        checks.existing_folder("resume", request.resume)
    configs = configs_of(request)
    if request.resume is not None and len(configs) != 1:
        raise ConfigError(f"train: --resume takes a config with one run; {request.config} holds {len(configs)} [[runs]]")
    check_configs(configs, request.resume)
    return configs


def check_configs(configs: list[TrainConfig], resume: str | None = None) -> None:
    """What a TrainConfig cannot check itself: the family knobs, the data folder, the output and the resumed run."""
    from studio.adapters import registry

    for config in configs:
        registry.make_config(config.family, config.adapter)
        checks.existing_folder("data", config.data)
        if Path(config.output_dir).is_file():
            raise PathError(f"output_dir: {config.output_dir} is a file, not a folder")
        check_memory(config)
    if resume is not None:
        folder = checks.existing_folder("resume", resume)
        if not (folder / "config.toml").is_file():
            raise PathError(f"resume: {folder} holds no run to resume (no config.toml)")


@dataclass
class MemoryEstimate:
    """What the adapter of a run costs before anything is built: trainable numbers, their bytes
    (weights, gradients, AdamW moments), its fixed buffers, and what the device has free."""

    trainable: int
    buffers_bytes: int
    device: str
    free_bytes: int | None

    @property
    def bytes(self) -> int:
        return self.trainable * BYTES_PER_TRAINABLE + self.buffers_bytes


def estimate_memory(config: TrainConfig) -> MemoryEstimate | None:
    """The adapter's size from its family's own build on the meta device (no memory used) over the
    base's weightless module tree; None when the base has no stored tree (a hub id) or the family
    cannot be built there."""
    import torch

    from studio.adapters import registry
    from studio.bases import is_hub_id, module_tree
    from studio.verbs.generate import free_memory

    if is_hub_id(config.base):
        return None
    try:
        tree = module_tree(config.base)
        with torch.device("meta"):
            adapter = registry.build_adapter(config.family, registry.make_config(config.family, config.adapter), tree)
    except StudioError:
        raise
    except Exception:  # noqa: BLE001 - an op without a meta kernel: no estimate, the run's own build decides
        return None
    trainable = sum(p.numel() for p in adapter.parameters() if p.requires_grad)
    buffers = sum(b.numel() * b.element_size() for b in adapter.buffers())
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return MemoryEstimate(trainable, buffers, str(device), free_memory(device))


def check_memory(config: TrainConfig) -> None:
    """Refuse a run whose adapter alone would not fit in what the device has free (LimitError
    naming the numbers and the knobs to lower), before any model is loaded."""
    estimate = estimate_memory(config)
    if estimate is None or estimate.free_bytes is None or estimate.bytes <= estimate.free_bytes:
        return
    raise LimitError(f"train: the {config.family} adapter with {config.adapter or 'its default knobs'} has "
                     f"{estimate.trainable:,} trainable numbers: about {checks.memory_text(estimate.bytes)} for them, their gradients "
                     f"and AdamW's moments, and {estimate.device} has {checks.memory_text(estimate.free_bytes)} free: lower the "
                     "rank (or d / groups)")


def run(request: TrainRequest, stop: threading.Event | None = None) -> Iterator[Event]:
    """Train every run of the request's config; ``stop`` set (Ctrl-C, the app's Stop button) ends
    the current run at the next step with a checkpoint saved. Ends with ``Done(TrainOutcome)``."""
    configs = check(request)
    if request.threads:
        import torch

        torch.set_num_threads(request.threads)
    yield from train_runs(configs, request.resume, stop)


def train_runs(configs: list[TrainConfig], resume: str | None = None, stop: threading.Event | None = None) -> Iterator[Event]:
    """Train configs built elsewhere (the app's form) after `check_configs`; ``Done(TrainOutcome)``."""
    from studio.train import train

    check_configs(configs, resume)
    runs = []
    for config in configs:
        started = time.perf_counter()
        result = None
        for event in train(config, resume_dir=resume, stop=stop):
            if isinstance(event, Done):
                result = event.result
            else:
                yield event
        runs.append(RunOutcome(config, result, time.perf_counter() - started))
        if stop is not None and stop.is_set():
            break
    yield Done(TrainOutcome(runs, export_warnings(runs)))


def export_warnings(runs: list[RunOutcome]) -> list[str]:
    """A warning, with the number, for every export that is not faithful."""
    return [f"{run.config.run_name}: the exported LoRA differs from the trained adapter by a relative error of "
            f"{run.result.export_error:.2%} (above {FAITHFUL:.0%}); the native file is {run.result.adapter_path}"
            for run in runs if run.result.export_error is not None and run.result.export_error > FAITHFUL]
