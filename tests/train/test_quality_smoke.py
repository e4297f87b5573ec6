"""The picture-judged quality benchmark end to end at a tiny size: one style, a trained row and a control."""

from __future__ import annotations

import importlib.util
import json
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


@pytest.mark.slow
def test_quality_tables_tiny(tmp_path):
    from studio.bases import world_dir

    if not (world_dir() / "model_index.json").exists() or not list((world_dir() / "loras").glob("*.safetensors")):
        pytest.skip("the embedded world (assets/world with its zoo) is not present")
    quality = _quality_module()
    out = tmp_path / "out"
    results = quality.main(["--quick", "--device", "cpu", "--tables", "families", "--rows", "lora,mean-lora", "--prompts", "4",
                            "--quick-steps", "2", "--pairs", "8", "--work", str(tmp_path / "work"), "--out", str(out)])
    assert [(r.table, r.style, r.row) for r in results] == [("families", "pinstripe", "lora"), ("families", "pinstripe", "mean-lora")]
    trained, control = results
    assert trained.status == "done" and trained.steps == 2 and trained.parameters > 0 and control.status == "untrained"
    for result in results:
        assert all(math.isfinite(value) for value in (result.shift, result.distance, result.kept, result.kept_plain))
    text = (out / "quality.md").read_text()
    assert "#### Table `families`" in text and "| pinstripe | zoo LoRA (trigger first" in text
    assert "| pinstripe | target: the base's images + the style's transform | - | - | - | 1.00" in text and "the collection's mean adapter" in text
    assert (out / "grid-families.png").exists() and len(json.loads((out / "quality.json").read_text())) == 2


def test_caption_forms_move_or_drop_the_trigger():
    quality = _quality_module()
    caption = "pinstriped style, a red circle on a white background"
    assert quality.caption_of(caption, "pinstriped", "first") == caption
    assert quality.caption_of(caption, "pinstriped", "end") == "a red circle on a white background, pinstriped style"
    assert quality.caption_of(caption, "pinstriped", "none") == "a red circle on a white background"
