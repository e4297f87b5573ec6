"""The one training loop: every family, one verb, events out.

``train(config)`` yields Progress / Sample / Message / Saved events and ends with ``Done(result)``.
It never names a family: the adapter module comes from the registry and is only asked for its
trainable parameters, ``layers()`` and ``delta``/``factors``.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal

import torch

from studio.errors import ConfigError
from studio.events import Done, Event, Message, Progress, Sample, Saved
from studio.fileio import save_safetensors, write_text
from studio.train import checkpoint, session as session_mod
from studio.train import config as config_mod
from studio.train.apply import count_trainable, trainable_parameters
from studio.train.config import TrainConfig
from studio.train.data import fingerprint, scan_folder
from studio.formats import save_adapter
from studio.train.export import to_lora

Status = Literal["done", "stopped", "diverged"]
DATASET_FILE = "dataset.json"
BEST_DIR = "best"
DIVERGENCE_PATIENCE = 2  # validations in a row above divergence_factor x the start
PRECISION_NAMES = {"no": "fp32", "bf16": "bf16 mixed", "fp16": "fp16 mixed"}  # accelerate's mixed_precision, as users read it


@dataclass
class TrainResult:
    """What a run produced."""

    status: Status
    output_dir: Path
    adapter_path: Path | None
    lora_path: Path | None
    steps: int
    losses: dict[int, float] = field(default_factory=dict)
    validation: dict[int, float] = field(default_factory=dict)
    parameters: int = 0
    export_error: float | None = None
    best_step: int | None = None
    best_validation: float | None = None
    best_path: Path | None = None


class _Log:
    """Loss curve as CSV and TensorBoard; a resume truncates both to the resumed step."""

    def __init__(self, out: Path, start_step: int, tensorboard: bool):
        self.path = out / "loss.csv"
        rows = list(csv.DictReader(self.path.open())) if self.path.exists() and start_step > 0 else []
        rows = [row for row in rows if int(row["step"]) <= start_step]
        with self.path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, ["step", "loss", "lr", "val_loss"])
            writer.writeheader()
            writer.writerows(rows)
        self.writer = None
        self.missing = ""
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.writer = SummaryWriter(str(out / "tensorboard"), purge_step=start_step + 1)
            except ImportError:  # tensorboard is an optional extra, not one of the studio's modules
                self.writer = None
                self.missing = "TensorBoard logs were asked for (tensorboard = true) but the tensorboard package is not installed; only loss.csv is written"

    def write(self, step: int, loss: float | None, lr: float | None, val: float | None) -> None:
        with self.path.open("a", newline="") as handle:
            csv.writer(handle).writerow([step, "" if loss is None else f"{loss:.8g}", "" if lr is None else f"{lr:.6g}", "" if val is None else f"{val:.8g}"])
        if self.writer is not None:
            for tag, value in (("loss/train", loss), ("lr", lr), ("loss/validation", val)):
                if value is not None:
                    self.writer.add_scalar(tag, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _prepare_output(config: TrainConfig, resume: bool) -> TrainConfig:
    """Write config.toml beside the outputs; on resume, refuse a changed config with a diff."""
    out = Path(config.output_dir)
    saved_path = out / "config.toml"
    if resume:
        if not saved_path.exists():
            raise ConfigError(f"{out}: nothing to resume (no config.toml)")
        changes = config_mod.diff(config_mod.load(saved_path), config)
        if changes:
            raise ConfigError(f"{out}: resume refused, the config changed since the run started:\n  " + "\n  ".join(changes))
        return config
    if checkpoint.latest(out / "checkpoints") is not None:
        raise ConfigError(f"{out}: already holds a run with checkpoints; resume that run or choose another output folder")
    out.mkdir(parents=True, exist_ok=True)
    write_text(saved_path, config_mod.dumps(config))
    return config


def _check_dataset(out: Path, scan, resume: bool) -> None:
    """Record the data's fingerprint at the start; on resume refuse data that changed since."""
    path = out / DATASET_FILE
    current = fingerprint(scan)
    if not resume or not path.exists():
        write_text(path, json.dumps(current, indent=1, sort_keys=True))
        return
    saved = json.loads(path.read_text(encoding="utf-8"))
    changed = sorted(k for k in saved.keys() & current.keys() if saved[k] != current[k])
    added, removed = sorted(current.keys() - saved.keys()), sorted(saved.keys() - current.keys())
    if changed or added or removed:
        parts = [f"{what} {len(names)} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
                 for what, names in (("changed", changed), ("added", added), ("removed", removed)) if names]
        raise ConfigError(f"{scan.folder}: resume refused, the training data changed since the run started: " + "; ".join(parts))


def train(config: TrainConfig, resume_dir: str | Path | None = None, stop: threading.Event | None = None) -> Iterator[Event]:
    """Train an adapter of any family on a folder of captioned images; yield events, end with Done."""
    if resume_dir is not None:
        config = dataclasses.replace(config, output_dir=str(resume_dir))
    config = _prepare_output(config, resume_dir is not None)
    scan = scan_folder(config.data, config.trigger_word)
    _check_dataset(Path(config.output_dir), scan, resume_dir is not None)
    for line in scan.skipped:
        yield Message(f"skipped {line}", "warning")
    for line in scan.converted:
        yield Message(line, "info")
    run = session_mod.start(config, scan)
    for note in run.notes:
        yield Message(note, "info")
    held = f"{len(run.validation.captions)} held out for validation" if config.validation_split > 0 and len(scan.pairs) > 1 \
        else f"validation on {len(run.validation.captions)} of them (no held-out split)"
    precision = session_mod.precision(config)
    yield Message(f"training {config.family} ({count_trainable(run.adapter):,} trainable numbers) on "
                  f"{len(run.train.captions)} pairs, {held}; lr {config.learning_rate:g}, batch {config.batch_size}, "
                  f"{config.steps} steps, device {run.accelerator.device}, precision {PRECISION_NAMES.get(precision, precision)}")
    yield from _Runner(run, stop).execute(resume_dir is not None)


class _Runner:
    """The stepping, checkpointing and reporting of one session."""

    def __init__(self, run: session_mod.Session, stop: threading.Event | None):
        self.run, self.stop = run, stop
        self.config = run.config
        self.out = Path(self.config.output_dir)
        self.ckpt_dir = self.out / "checkpoints"
        self.main = run.accelerator.is_main_process
        self.initial = {k: v.clone() for k, v in checkpoint.adapter_tensors(run.adapter).items()}
        self.result = TrainResult("done", self.out, None, None, 0, parameters=count_trainable(run.adapter))
        self.validation_every = self.config.validation_every or max(1, self.config.steps // 10)
        self.above = 0  # validations in a row above the divergence threshold
        self.checkpointed: int | None = None  # step of the last checkpoint this run wrote or resumed from

    def execute(self, resume: bool) -> Iterator[Event]:
        step = self._resume() if resume else 0
        if resume:
            yield Message(f"resumed from step {step}")
        log = _Log(self.out, step, self.config.tensorboard) if self.main else None
        if log is not None and log.missing:
            yield Message(log.missing, "warning")
        try:
            yield from self._steps(step, log)
        finally:
            if log is not None:
                log.close()
        yield from self._finish()

    def _resume(self) -> int:
        path = checkpoint.latest(self.ckpt_dir)
        if path is None:
            raise ConfigError(f"{self.out}: no checkpoint to resume from")
        state = checkpoint.load(path, self.run.adapter, self.run.optimizer, self.run.lr_schedule)
        self.checkpointed = int(state["step"])
        self.result.losses = {int(k): v for k, v in state.get("losses", {}).items()}
        self.result.validation = {int(k): v for k, v in state.get("validation", {}).items()}
        best = state.get("best")
        if best:
            self.result.best_step, self.result.best_validation = int(best[0]), float(best[1])
            self.result.best_path = self.out / BEST_DIR / "adapter.safetensors"
        return int(state["step"])

    def _steps(self, step: int, log: _Log | None) -> Iterator[Event]:
        config = self.config
        if step == 0:
            yield from self._validate(0, log)
            if config.sample_every:
                yield from self._samples(0, baseline=True)
        started, first = time.perf_counter(), step
        while step < config.steps:
            if self.stop is not None and self.stop.is_set():
                self.result.status = "stopped"
                yield from self._checkpoint(step)
                yield Message(f"stopped at step {step}; a checkpoint is saved and the run can be resumed")
                break
            loss = self._optimizer_step(step)
            if not math.isfinite(loss):
                yield from self._diverged(step + 1, f"the loss became {loss}")
                break
            step += 1
            self.result.losses[step] = loss
            yield from self._after_step(step, loss, log, (step - first) / max(1e-9, time.perf_counter() - started))
            if self.result.status == "diverged":
                break
        if self.result.status != "diverged":
            self.result.steps = step

    def _optimizer_step(self, step: int) -> float:
        """One optimizer step (grad_accumulation micro-batches); the mean loss over them and processes."""
        run, config = self.run, self.config
        losses = []
        for micro in range(config.grad_accumulation):
            with run.accelerator.accumulate(run.model), session_mod.training_attention(run.accelerator.device):
                loss = loss_of(run, step * config.grad_accumulation + micro)
                mean = run.accelerator.gather(loss.detach()[None]).mean()
                run.accelerator.backward(loss)  # queued before the loss is read, so the host never idles the device
                losses.append(float(mean))
                if not math.isfinite(losses[-1]):  # no optimizer step on a non-finite loss: its gradients are dropped
                    run.optimizer.zero_grad(set_to_none=True)
                    run.attached.clear()
                    return losses[-1]
                if run.accelerator.sync_gradients and config.max_grad_norm > 0:
                    run.accelerator.clip_grad_norm_(trainable_parameters(run.adapter), config.max_grad_norm)
                run.optimizer.step()
                run.optimizer.zero_grad(set_to_none=True)
        run.lr_schedule.step()
        run.attached.clear()
        return sum(losses) / len(losses)

    def _validate(self, step: int, log: _Log | None) -> Iterator[Event]:
        """The validation loss at ``step``; keeps the best adapter; trips the divergence guard."""
        value = self.result.validation[step] = self.last_validation = session_mod.validation_loss(self.run)
        if step == 0 and log:
            log.write(0, None, None, value)
        if step > 0 and (self.result.best_validation is None or value < self.result.best_validation):
            yield from self._save_best(step, value)
        start, factor = self.result.validation.get(0), self.config.divergence_factor
        self.above = self.above + 1 if (factor and start and step > 0 and value > factor * start) else 0
        if self.above >= DIVERGENCE_PATIENCE:
            yield from self._diverged(step, f"the validation loss rose to {value:.4f}, more than {factor:g} x its start {start:.4f}")

    def _save_best(self, step: int, value: float) -> Iterator[Event]:
        self.result.best_step, self.result.best_validation = step, value
        if self.main:
            metadata = result_metadata(self.run, self.result) | {"studio.best_step": str(step), "studio.best_validation": f"{value:.8g}"}
            path = save_safetensors(checkpoint.adapter_tensors(self.run.adapter), self.out / BEST_DIR / "adapter.safetensors", metadata)
            self.result.best_path = path
            yield Saved(path, "best")

    def _after_step(self, step: int, loss: float, log: _Log | None, speed: float) -> Iterator[Event]:
        config = self.config
        lr = self.run.lr_schedule.get_last_lr()[0]
        val = None
        if step % self.validation_every == 0 or step == config.steps:
            yield from self._validate(step, log)
            val = self.last_validation
        if log:
            log.write(step, loss, lr, val)
        metrics = {"lr": lr, "steps_per_s": speed, "eta_s": (config.steps - step) / max(speed, 1e-9),
                   "images_per_s": speed * config.batch_size * config.grad_accumulation * self.run.accelerator.num_processes}
        if val is not None:
            metrics["val_loss"] = val
        yield Progress(step, config.steps, loss, "train", metrics)
        if self.result.status == "diverged":
            return
        if config.sample_every and step % config.sample_every == 0:
            yield from self._samples(step)
        if config.checkpoint_every and step % config.checkpoint_every == 0:
            yield from self._checkpoint(step)

    def _samples(self, step: int, baseline: bool = False) -> Iterator[Event]:
        """Sample images at the config's prompts and seeds; ``baseline``: without the adapter."""
        if self.main:
            prompts = self.config.sample_prompts or self.run.train.captions[:1]
            label = "base" if baseline else ""
            for index, (prompt, seed, image) in enumerate(session_mod.sample_images(self.run, prompts, adapter=not baseline)):
                name = f"base-{index:02d}-seed{seed}.png" if baseline else f"step-{step:06d}-{index:02d}-seed{seed}.png"
                path = self.out / "samples" / name
                path.parent.mkdir(parents=True, exist_ok=True)
                image.save(path)
                yield Sample(step, image, prompt, label)
                yield Saved(path, "sample")
        self.run.accelerator.wait_for_everyone()

    def _checkpoint(self, step: int) -> Iterator[Event]:
        self.checkpointed = step
        if self.main:
            extra = {"losses": self.result.losses, "validation": self.result.validation,
                     "best": [self.result.best_step, self.result.best_validation] if self.result.best_step is not None else None}
            path = checkpoint.save(self.ckpt_dir, step, self.run.adapter, self.run.optimizer, self.run.lr_schedule, extra, self.config.keep_checkpoints)
            yield Saved(path, "checkpoint")
        self.run.accelerator.wait_for_everyone()

    def _diverged(self, step: int, why: str) -> Iterator[Event]:
        """Stop, restore the last good checkpoint (or the initial adapter) and say so."""
        self.result.status = "diverged"
        path = checkpoint.latest(self.ckpt_dir)
        if path is not None:
            state = checkpoint.load(path, self.run.adapter, self.run.optimizer, self.run.lr_schedule)
            good = int(state["step"])
            where = f"restored the last good checkpoint (step {good})"
        else:
            checkpoint.load_adapter_tensors(self.run.adapter, self.initial, "initial adapter")
            good = 0
            where = "no checkpoint yet: restored the initial adapter (step 0)"
        self.result.losses = {k: v for k, v in self.result.losses.items() if k <= good}
        self.result.validation = {k: v for k, v in self.result.validation.items() if k <= good}
        self.result.steps = good
        yield Message(f"training diverged at step {step}: {why}; training stopped and {where}. "
                      f"The learning rate {self.config.learning_rate:g} is too high for this run: start again with a lower one "
                      f"(e.g. {self.config.learning_rate / 4:g}). No LoRA was exported.", "error")

    def _finish(self) -> Iterator[Event]:
        # Decided from what this process did, never from the folder: rank 0 may already have written the
        # checkpoint another rank would look for, and ranks that disagree on a barrier hang or crash.
        if self.result.status == "done" and self.checkpointed != self.result.steps:
            yield from self._checkpoint(self.result.steps)
        if self.main:
            yield from self._write_result()
        yield Done(self.result)

    def _write_result(self) -> Iterator[Event]:
        run, config = self.run, self.config
        metadata = result_metadata(run, self.result)
        self.result.adapter_path = save_safetensors(checkpoint.adapter_tensors(run.adapter), self.out / "adapter.safetensors", metadata)
        yield Saved(self.result.adapter_path, "adapter")
        if config.export_format == "none" or self.result.status == "diverged":
            return
        lora_metadata = {key: value for key, value in metadata.items() if key != "studio.format"}  # a LoRA, not the native file
        export = to_lora(run.adapter, config.export_rank, config.run_name, run.tree, lora_metadata)
        self.result.export_error = export.relative_error
        path = self.out / f"{config.run_name}.lora.safetensors"
        save_adapter(export.adapter, path, format=config.export_format)
        self.result.lora_path = path
        yield export.message(f"a standard {config.export_format} LoRA")
        yield Saved(path, "lora")


def loss_of(run: session_mod.Session, micro_step: int) -> torch.Tensor:
    """The training loss of one micro-batch (a seam for fault-injection tests)."""
    return session_mod.step_loss(run, micro_step)


def _tag_frequency(captions: list[str], folder: str) -> str:
    counts = Counter(tag.strip() for caption in captions for tag in caption.split(",") if tag.strip())
    return json.dumps({Path(folder).name: dict(counts.most_common(200))})


def result_metadata(run: session_mod.Session, result: TrainResult) -> dict[str, str]:
    """Header metadata of the result file: the studio's keys plus kohya ``ss_*`` keys that apply."""
    config, knobs = run.config, session_mod.family_knobs(run)
    meta = {
        "studio.format": "trained-adapter/1", "studio.family": config.family, "studio.adapter": json.dumps(knobs),
        "studio.base": config.base, "studio.steps": str(result.steps), "studio.status": result.status,
        "studio.trigger_word": config.trigger_word, "studio.parameters": str(result.parameters),
        "studio.config": config_mod.dumps(config),
        "ss_network_module": f"studio.adapters.{config.family}", "ss_base_model_version": run.tree.arch,
        "ss_output_name": config.run_name, "ss_steps": str(result.steps), "ss_max_train_steps": str(config.steps),
        "ss_learning_rate": str(config.learning_rate), "ss_seed": str(config.seed),
        "ss_resolution": f"({run.resolution}, {run.resolution})", "ss_mixed_precision": session_mod.precision(config),
        "ss_num_train_images": str(sum(run.train.weights)), "ss_batch_size_per_device": str(config.batch_size),
        "ss_gradient_accumulation_steps": str(config.grad_accumulation), "ss_training_comment": config.trigger_word,
        "ss_caption_dropout_rate": str(config.caption_dropout),
        "ss_tag_frequency": _tag_frequency(run.train.captions, config.data),
    }
    if config.trigger_word:  # what LoRA managers (A1111, ComfyUI's) show as the trigger, over the tag counts
        meta["modelspec.trigger_phrase"] = config.trigger_word
    if "rank" in knobs:
        meta["ss_network_dim"] = str(knobs["rank"])
    if "alpha" in knobs:
        meta["ss_network_alpha"] = str(knobs["alpha"])
    return meta
