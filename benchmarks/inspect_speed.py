"""Time `studio inspect FILE` as a whole process, the way a user runs it (issue 15: target <= 1 s).

    python benchmarks/inspect_speed.py [FILE ...] [--runs 7] [--checkout PATH ...] [--base BASE]

Each run is a fresh ``python -m studio inspect FILE`` with ``PYTHONPATH`` set to the checkout
(default: this one); the first run of each checkout warms the folder-tree cache and the OS file
cache and is reported apart. Also timed, as floors: ``python -c "import torch"`` and ``python -c
"import studio.verbs"`` (what the CLI imports before it parses arguments). The machine's load
average is printed with the numbers: on a shared machine, compare checkouts in the same run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_FILE = REPO / "assets" / "world" / "loras" / "noir.safetensors"


def timed(command: list[str], checkout: Path) -> float:
    env = {**os.environ, "PYTHONPATH": str(checkout), "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    done = subprocess.run(command, cwd=checkout, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    elapsed = time.perf_counter() - start
    if done.returncode not in (0, 1):
        raise SystemExit(f"{' '.join(command)} failed in {checkout}: {done.stderr.strip()[-500:]}")
    return elapsed


def series(command: list[str], checkout: Path, runs: int) -> tuple[float, list[float]]:
    first = timed(command, checkout)
    return first, [timed(command, checkout) for _ in range(runs)]


def report(label: str, first: float, times: list[float]) -> None:
    print(f"{label:<58} first {first:6.2f} s | median {statistics.median(times):6.2f} s, min {min(times):6.2f} s over {len(times)} runs")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="*", default=[str(DEFAULT_FILE)], help="LoRA files to inspect (one process each)")
    parser.add_argument("--runs", type=int, default=7, help="timed runs per command after the warm-up run")
    parser.add_argument("--checkout", action="append", default=None, help="checkouts to compare (default: this one)")
    parser.add_argument("--base", default=None, help="pass --base BASE to inspect")
    args = parser.parse_args(argv)
    checkouts = [Path(c).resolve() for c in (args.checkout or [str(REPO)])]
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start")
    for checkout in checkouts:
        print(f"== {checkout}")
        report("python -c 'import torch'", *series([sys.executable, "-c", "import torch"], checkout, args.runs))
        report("python -c 'import studio.verbs'", *series([sys.executable, "-c", "import studio.verbs"], checkout, args.runs))
        for file in args.files:
            command = [sys.executable, "-m", "studio", "inspect", str(Path(file).resolve())] + (["--base", args.base] if args.base else [])
            report(f"studio inspect {Path(file).name}" + (f" --base {args.base}" if args.base else ""), *series(command, checkout, args.runs))
    print(f"load average {os.getloadavg()[0]:.2f} at end")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
