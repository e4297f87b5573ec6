"""The engine's batched kernels on CUDA (fp16): skipped without a GPU (run on the device machine)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

pytestmark = pytest.mark.gpu


DEVICE, DTYPE = "cuda", torch.float16


@pytest.fixture(scope="module")
def cuda_engine():
    from engine_models import build_pipeline, random_loras

    from studio.engine import Engine, EngineConfig

    pipe = build_pipeline("sd15", torch.device(DEVICE), DTYPE, quick=True)
    engine = Engine(pipe, "sd15", EngineConfig(device=DEVICE, dtype=str(DTYPE).removeprefix("torch.")))
    loras = random_loras(pipe.unet, 4, 8)
    return engine, [engine.register(lora.name, lora) for lora in loras], loras


def test_stacked_merge_on_cuda_equals_w0_plus_delta(cuda_engine):
    engine, names, loras = cuda_engine
    layer = loras[1].layers()[0]
    w0 = engine.live.pristine2d(layer).float().clone()
    for name in names + [names[1]]:
        engine.activate(name)
    got = engine.live.live2d(layer).float()
    torch.testing.assert_close(got, w0 + loras[1].delta(layer).to(DEVICE).reshape(got.shape), rtol=2e-3, atol=2e-3)
    engine.restore()
    assert torch.equal(engine.live.live2d(layer).float(), w0)


def test_per_image_on_cuda_matches_each_merged_adapter(cuda_engine):
    from benchmarks_inputs import unet_inputs

    engine, names, _ = cuda_engine
    unet = engine.pipe.unet
    inputs = unet_inputs(unet, "sd15", len(names), torch.device(DEVICE), DTYPE)
    with torch.no_grad():
        merged = []
        for name in names:
            engine.activate(name)
            merged.append(unet(**inputs).sample.float())
        engine.restore()
        with engine.per_image(names):
            batched = unet(**inputs).sample.float()
    for i in range(len(names)):
        torch.testing.assert_close(batched[i], merged[i][i], rtol=2e-2, atol=2e-2)


def test_flux_per_image_on_cuda_bf16_matches_each_merged_adapter(tiny_flux_dir):
    from flux_engine import transformer_inputs
    from flux_models import random_loras

    from studio.engine import Engine, EngineConfig

    engine = Engine.load(str(tiny_flux_dir), EngineConfig(device=DEVICE))  # auto: bfloat16 for FLUX on CUDA
    assert engine.pipe.transformer.dtype == torch.bfloat16
    loras = random_loras(engine.pipe.transformer, 3, 4)
    entries = [(engine.register(lora.name, lora), 30.0) for lora in loras]  # weight 30: effects well above bf16 rounding
    inputs = transformer_inputs(engine.pipe, len(entries), 32, torch.device(DEVICE), torch.bfloat16, text_tokens=16)
    with torch.no_grad():
        merged = []
        for entry in entries:
            engine.activate([entry])
            merged.append(engine.pipe.transformer(**inputs)[0].float())
        engine.restore()
        with engine.per_image(entries):
            batched = engine.pipe.transformer(**inputs)[0].float()
    assert float((merged[0][0] - merged[1][0]).abs().max()) > 0.1
    for i in range(len(entries)):
        torch.testing.assert_close(batched[i], merged[i][i], rtol=2e-2, atol=3e-2)
