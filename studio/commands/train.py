"""``studio train``: train an adapter of any family on a folder of captioned images.

    studio train pipelines/train_lora.toml
    studio train pipelines/train_lora.toml --resume runs/train-lora
    studio train pipelines/quality.toml            # several [[runs]]: prints the quality table
    accelerate launch --num_processes 2 -m studio.cli train pipelines/train_lora.toml

Draws a progress bar (loss, speed) from the verb's events; Ctrl-C stops at the next step with a
checkpoint saved. A thin caller of ``studio.train.train``.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``train`` on the CLI's subparsers."""
    parser = subparsers.add_parser("train", help="train an adapter (lora, superlora, unilora, eigenlora) on images + captions",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", type=Path, help="train config TOML (see studio/train/config.py)")
    parser.add_argument("--resume", type=Path, default=None, metavar="DIR", help="continue the run in DIR (its config must match)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    return parser


def _drive(events, stop: threading.Event, quiet: bool = False) -> object:
    """Draw events; return the Done result. Ctrl-C sets the stop flag and lets the loop checkpoint.
    ``quiet`` (the other processes of a multi-process run) draws nothing."""
    from tqdm import tqdm

    from studio.events import Done, Message, Progress, Sample, Saved

    bar, result = None, None
    iterator = iter(events)
    while True:
        try:
            event = next(iterator)
        except StopIteration:
            break
        except KeyboardInterrupt:
            stop.set()
            print("\nstopping after this step (checkpoint will be saved) ...", file=sys.stderr)
            continue
        if quiet and not isinstance(event, Done):
            continue
        if isinstance(event, Progress):
            if bar is None:
                bar = tqdm(total=event.total, initial=event.step - 1, unit="step", dynamic_ncols=True)
            bar.update(event.step - bar.n)
            postfix = {"loss": f"{event.loss:.4f}"} | {k: f"{v:.4g}" for k, v in event.metrics.items() if k in ("val_loss", "lr")}
            bar.set_postfix(postfix)
        elif isinstance(event, Message):
            (bar.write if bar else print)(f"[{event.level}] {event.text}")
        elif isinstance(event, Saved) and event.kind != "sample":
            (bar.write if bar else print)(f"saved {event.kind}: {event.path}")
        elif isinstance(event, Sample):
            pass
        elif isinstance(event, Done):
            result = event.result
    if bar is not None:
        bar.close()
    return result


def run(args: argparse.Namespace) -> int:
    """Train one config, or every ``[[runs]]`` entry of a quality recipe (then print the table)."""
    import torch

    from studio.train import train
    from studio.train.config import load_runs

    if args.threads:
        torch.set_num_threads(args.threads)
    configs = load_runs(args.config)
    if args.resume is not None and len(configs) != 1:
        print("error: --resume takes a config with one run", file=sys.stderr)
        return 2
    main_process = int(os.environ.get("RANK", "0")) == 0  # under accelerate launch / torchrun only rank 0 prints
    rows = []
    for config in configs:
        started = time.perf_counter()
        stop = threading.Event()
        result = _drive(train(config, resume_dir=args.resume, stop=stop), stop, quiet=not main_process)
        rows.append((config, result, time.perf_counter() - started))
        if main_process:
            print(f"{config.run_name}: {result.status} after {result.steps} steps -> {result.adapter_path}")
    if len(rows) > 1 and main_process:
        print(quality_table(rows))
    return 0 if all(r.status == "done" for _, r, _ in rows) else 1


def quality_table(rows: list) -> str:
    """One line per run: family, trainable numbers, validation loss first -> last, export error, time."""
    lines = [f"{'run':<24} {'family':<10} {'params':>10} {'val@0':>8} {'val@end':>8} {'drop':>7} {'export err':>10} {'time s':>7}"]
    for config, result, seconds in rows:
        first, last = result.validation.get(0, float("nan")), result.validation.get(result.steps, float("nan"))
        error = "-" if result.export_error is None else f"{result.export_error:.4f}"
        lines.append(f"{config.run_name:<24} {config.family:<10} {result.parameters:>10,} {first:>8.4f} {last:>8.4f} "
                     f"{(first - last) / first:>7.2%} {error:>10} {seconds:>7.1f}")
    return "\n".join(lines)
