"""Data-parallel training check: one process against `accelerate launch --num_processes N`, same global batch.

    python benchmarks/multi_gpu_train.py --processes 2                 # a 2-GPU machine (NCCL)
    python benchmarks/multi_gpu_train.py --processes 2 --cpu --quick   # CPU smoke size (gloo)

One world style is rendered once by the dataset verb (what `studio dataset --style S -o DIR` runs); the same config (seed, steps, learning rate, global batch) is
trained by one process and by N processes (per-process batch = global / N) through `studio train`.
Prints each run's validation loss at the start and end, training images per second, and the ratios
against the single-process anchor measured in the same run.
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def _config(data: Path, output: Path, batch: int, args) -> Path:
    from studio.train.config import TrainConfig, dumps

    config = TrainConfig(
        base="world", data=str(data), output_dir=str(output), family="lora", adapter={"rank": 8, "alpha": 8},
        steps=args.steps, batch_size=batch, learning_rate=2e-3, seed=0, validation_split=args.val_images / (args.train_images + args.val_images),
        validation_every=args.steps // 4, checkpoint_every=0, export_format="none", tensorboard=False,
        mixed_precision="no" if args.cpu else "auto",
    )
    path = output.with_suffix(".toml")
    path.write_text(dumps(config))
    return path


def _launch(config: Path, processes: int, args) -> float:
    """Run `studio train` in 1 or N processes; return the wall seconds of the training itself."""
    if processes == 1:
        command = [sys.executable, "-m", "studio.cli", "train", str(config)]
    elif args.cpu:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "-m", "studio.cli", "train", str(config)]
    else:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
                   "--mixed_precision", "bf16", "-m", "studio.cli", "train", str(config)]
    environment = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    if args.cpu:
        environment["CUDA_VISIBLE_DEVICES"] = ""
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-4000:]}")
    return time.perf_counter() - started


def _validation(output: Path) -> dict[int, float]:
    """Validation losses by step, from the run's loss.csv."""
    with (output / "loss.csv").open() as handle:
        return {int(r["step"]): float(r["val_loss"]) for r in csv.DictReader(handle) if r["val_loss"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--cpu", action="store_true", help="processes on the CPU (gloo) instead of one GPU each")
    parser.add_argument("--quick", action="store_true", help="CPU smoke size")
    parser.add_argument("--style", default="polka")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None, help="global batch (split across processes)")
    parser.add_argument("--work", default="runs/multi_gpu")
    args = parser.parse_args()
    steps, batch, args.train_images, args.val_images = (24, 4, 24, 8) if args.quick else (300, 32, 512, 64)
    args.steps, args.batch = args.steps or steps, args.batch or batch
    if args.batch % args.processes:
        raise SystemExit(f"--batch {args.batch} does not split across {args.processes} processes")

    from studio.verbs.dataset import DatasetRequest, run as make_dataset

    work = Path(args.work)
    data = work / "data"
    make_dataset(DatasetRequest(style=args.style, output=str(data), count=args.train_images + args.val_images))
    rows = []
    for processes in (1, args.processes):
        output = work / f"run-{processes}"
        config = _config(data, output, args.batch // processes, args)
        seconds = _launch(config, processes, args)
        validation = _validation(output)
        rows.append((processes, args.batch // processes, validation[0], validation[max(validation)], args.steps * args.batch / seconds, seconds))
    anchor = rows[0]
    device = "CPU (gloo)" if args.cpu else "GPU (NCCL)"
    print(f"\nstyle {args.style}, {args.steps} steps, global batch {args.batch}, LoRA r=8, {device}; images/s over the whole command\n")
    print("| processes | batch per process | val loss start | val loss end | end / anchor | images/s | x anchor | seconds |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for processes, per, start, end, speed, seconds in rows:
        print(f"| {processes} | {per} | {start:.5f} | {end:.5f} | {end / anchor[3]:.3f} | {speed:.1f} | {speed / anchor[4]:.2f} | {seconds:.1f} |")


if __name__ == "__main__":
    main()
