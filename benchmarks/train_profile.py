"""Where a `studio.train` step's time goes, per family: torch.profiler over a few steps of the real loop.

The SD1.5 architecture (random weights) trains through ``studio.train.train(config)`` exactly as in
``benchmarks/train_speed.py``; steps 4-6 of each run are recorded by ``torch.profiler`` and the
heaviest operators by self device time (and self CPU time) are printed, with the wall time per step.
A diagnosis tool, not a benchmark table.

    GPU:  python benchmarks/train_profile.py --device cuda --families lora,superlora
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine_models import build_pipeline  # noqa: E402
from flux_train import Run, bench_config, handed_pipeline, random_dataset  # noqa: E402

from studio.events import Progress  # noqa: E402
from studio.train import train  # noqa: E402

KNOBS = {"lora": {"rank": 32, "alpha": 32}, "superlora": {"groups": 16, "rank": 32, "alpha": 32},
         "unilora": {"d": 65536, "rank": 32, "alpha": 32}}


def profile_family(pipe, data: Path, out: Path, family: str, args) -> None:
    device = pipe.unet.device
    config = bench_config("sd15", data, out, Run(args.batch, family=family, knobs=KNOBS[family]), 8, args.size, device)
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
    profiler = torch.profiler.profile(activities=activities)
    stamps = []
    with handed_pipeline(pipe) as sessions:
        for event in train(config):
            if isinstance(event, Progress):
                stamps.append(time.perf_counter())
                if event.step == 3:
                    profiler.start()
                elif event.step == 6:
                    profiler.stop()
        for run in sessions:
            run.attached.detach()
    steps = [b - a for a, b in zip(stamps[3:6], stamps[4:7])]
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"\n## {family}: wall per profiled step {', '.join(f'{s * 1000:.0f}' for s in steps)} ms")
    print(profiler.key_averages().table(sort_by=sort, row_limit=args.rows, max_name_column_width=60))
    print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=8, max_name_column_width=60))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None)
    parser.add_argument("--families", default="lora,superlora")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--rows", type=int, default=15)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.device, args.size, args.batch = "cpu", 64, 1
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    pipe = build_pipeline("sd15", device, torch.bfloat16 if device.type == "cuda" else torch.float32, quick=args.quick)
    with tempfile.TemporaryDirectory() as folder:
        data = random_dataset(Path(folder) / "data", 8, args.size)
        for index, family in enumerate(args.families.split(",")):
            profile_family(pipe, data, Path(folder) / f"run{index}", family.strip(), args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
