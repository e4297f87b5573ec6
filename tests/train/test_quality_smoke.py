"""The quality benchmark end to end at a tiny size: 1 held-out style, 2 rows, a few steps."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _quality_module():
    spec = importlib.util.spec_from_file_location("quality_benchmark", ROOT / "benchmarks" / "quality.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _finite_numbers(value) -> list[float]:
    if isinstance(value, dict):
        return [x for v in value.values() for x in _finite_numbers(v)]
    if isinstance(value, (list, tuple)):
        return [x for v in value for x in _finite_numbers(v)]
    return [value] if isinstance(value, (int, float)) and not isinstance(value, bool) else []


def test_quality_table_tiny(tmp_path):
    from studio.bases import world_dir

    if not (world_dir() / "model_index.json").exists() or not list((world_dir() / "loras").glob("*.safetensors")):
        pytest.skip("the embedded world (assets/world with its zoo) is not present")
    quality = _quality_module()
    out = tmp_path / "table.md"
    result = quality.main([
        "--device", "auto", "--styles", "polka", "--rows", "lora,unilora", "--steps", "6", "--batch", "2",
        "--eval-every", "3", "--train-images", "8", "--val-images", "4", "--work", str(tmp_path / "work"), "--out", str(out),
    ])
    table = out.read_text()
    assert table == result["markdown"] + "\n"
    assert (tmp_path / "table.json").exists()
    for label in ("base (no adapter)", "| LoRA r=8 |", "| Uni-LoRA d=", "Style `polka`", "Mean over held-out styles"):
        assert label in table
    assert set(result["table"]) == {"polka", "mean"}
    for block in result["table"].values():
        assert list(block["rows"]) == ["lora", "unilora"]
        assert math.isfinite(block["base_loss"])
        for row in block["rows"].values():
            for key in ("final_loss", "gain", "gain_share", "step_ms"):
                assert math.isfinite(row[key]), (key, row)
            assert row["parameters"] > 0
        unilora = block["rows"]["unilora"]
        assert unilora["parameters"] <= 0.1 * block["rows"]["lora"]["parameters"]
        assert set(unilora["checks"]) == {"gain >= 95% of LoRA", "<= 10% of LoRA's numbers"}
    assert block["rows"]["lora"]["gain_share"] == pytest.approx(1.0)
    assert all(math.isfinite(x) for run in result["runs"] for x in _finite_numbers(run["validation"]))
    assert all(sorted(run["validation"]) == [0, 3, 6] for run in result["runs"])
