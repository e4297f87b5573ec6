"""Data-parallel training: the same run under torchrun with 2 CPU processes (gloo) trains like one process."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from studio.events import run_to_end
from studio.train import train
from studio.train.config import dumps
from tests.ports import free_port
from tests.train.helpers import tiny_config

ROOT = Path(__file__).resolve().parents[2]
STEPS = 20


def _rank_logs(folder: Path) -> str:
    """The tail of every rank's own stderr (torchrun's --log-dir), to say which rank died and why."""
    return "".join(f"--- {path.relative_to(folder)}\n{path.read_text(errors='replace')[-1500:]}\n"
                   for path in sorted(folder.rglob("stderr.log")))


def _validation(folder: Path) -> dict[int, float]:
    with (folder / "loss.csv").open() as handle:
        return {int(row["step"]): float(row["val_loss"]) for row in csv.DictReader(handle) if row["val_loss"]}


@pytest.mark.slow
def test_two_processes_train_like_one_with_the_same_global_batch(tiny_pipeline_dir, style_data, tmp_path):
    common = dict(adapter={"rank": 4, "alpha": 4}, steps=STEPS, validation_every=10)
    single = run_to_end(train(tiny_config(tiny_pipeline_dir, style_data, tmp_path / "one", batch_size=4, **common)))
    config = tmp_path / "two.toml"
    config.write_text(dumps(tiny_config(tiny_pipeline_dir, style_data, tmp_path / "two", batch_size=2, **common)))
    logs = tmp_path / "logs"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), "--log-dir", str(logs), "--redirects", "3", "--tee", "3",
               "-m", "studio.cli", "train", str(config)]
    environment = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    done = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, _rank_logs(logs) + done.stderr[-2000:]
    assert done.stdout.count(f"done after {STEPS} steps") == 1  # only rank 0 reports
    assert (tmp_path / "two" / "adapter.safetensors").exists()
    parallel = _validation(tmp_path / "two")
    assert sorted(parallel) == [0, 10, 20]
    assert parallel[0] == pytest.approx(single.validation[0], rel=1e-5)  # same base, same validation set
    assert parallel[STEPS] < 0.99 * parallel[0]
    assert parallel[STEPS] == pytest.approx(single.validation[STEPS], rel=0.02)  # same global batch: within noise
