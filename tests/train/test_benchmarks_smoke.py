"""The FLUX / SDXL training and FLUX engine GPU benchmarks run end to end at a tiny size on the CPU."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["flux_train", "sdxl_train", "flux_engine"])
def test_benchmark_runs_quick(name, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    module = importlib.import_module(name)
    argv = ["--quick"] + (["--steps", "1"] if name == "flux_engine" else ["--configs", "1,2c"] if name == "flux_train" else [])
    assert module.main(argv) == 0
    out = capsys.readouterr().out
    table = [line for line in out.splitlines() if line.startswith("| ")]
    assert len(table) >= 5 and "out of memory" not in out
    assert "anchor" in out
    if name.startswith("flux"):
        assert "small random stand-ins" in out  # the output says the text encoders are not the real ones
    sys.modules.pop(name, None)
