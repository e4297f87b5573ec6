"""Every family trains a few steps on CUDA in bf16 (run on the device machine; skipped elsewhere)."""

from __future__ import annotations

import math

import pytest
import torch

from studio.events import run_to_end
from studio.train import train
from tests.train.helpers import FAMILIES, family_of, tiny_config


@pytest.mark.gpu
@pytest.mark.parametrize("case", FAMILIES)
def test_family_trains_on_cuda_in_bf16(case, tiny_pipeline_dir, style_data, tmp_path, family_cases):
    knobs, lr = family_cases[case]
    config = tiny_config(tiny_pipeline_dir, style_data, tmp_path / "run", family_of(case), adapter=knobs,
                         learning_rate=lr, steps=20, mixed_precision="bf16", checkpoint_every=10, export_format="none")
    torch.cuda.reset_peak_memory_stats()
    result = run_to_end(train(config))
    assert result.status == "done" and result.steps == 20
    assert all(math.isfinite(v) for v in result.losses.values())
    assert result.validation[20] < result.validation[0]


@pytest.mark.gpu
def test_resume_is_exact_on_cuda(tiny_pipeline_dir, style_data, tmp_path, family_cases):
    import threading

    from studio.events import Progress

    common = dict(adapter=family_cases["lora"][0], learning_rate=3e-3, steps=6, checkpoint_every=3, mixed_precision="bf16")
    straight = run_to_end(train(tiny_config(tiny_pipeline_dir, style_data, tmp_path / "a", **common)))
    config = tiny_config(tiny_pipeline_dir, style_data, tmp_path / "b", **common)
    stop = threading.Event()
    for event in train(config, stop=stop):
        if isinstance(event, Progress) and event.step == 3:
            stop.set()
    resumed = run_to_end(train(config, resume_dir=tmp_path / "b"))
    assert [resumed.losses[s] for s in range(4, 7)] == pytest.approx([straight.losses[s] for s in range(4, 7)], rel=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("fixture,checkpointing", [("tiny_flux_dir", True), ("tiny_sd3_dir", False), ("tiny_sdxl_dir", True)])
def test_transformer_and_sdxl_bases_train_on_cuda_in_bf16(fixture, checkpointing, request, style_data, tmp_path):
    base = request.getfixturevalue(fixture)
    config = tiny_config(base, style_data, tmp_path / "run", "lora", adapter={"rank": 4, "alpha": 4}, learning_rate=3e-2,
                         steps=10, resolution=32, mixed_precision="bf16", gradient_checkpointing=checkpointing, export_format="kohya")
    result = run_to_end(train(config))
    assert result.status == "done" and all(math.isfinite(v) for v in result.losses.values())
    assert result.validation[10] < result.validation[0]
