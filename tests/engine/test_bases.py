"""The engine on every base: tiny FLUX.1-dev / -schnell, SD3.5 and SDXL pipelines (random weights).

Generate, switch A -> B -> A bit-exactly, mix, per-image batches equal to one-by-one generation
(the SD3 / SDXL CFG batch maps both halves to one image), LoRA files by path, PNG info.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from studio.engine import Engine, EngineConfig, GenerateRequest, read_png_parameters
from studio.errors import ConfigError
from tests.engine.conftest import random_lora

STEPS = 2
SIDE = 32
DENOISER_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "proj_mlp", "proj_out")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "SelfAttention.q", "SelfAttention.v")
BASES = ("flux", "schnell", "sd3", "sdxl")


@pytest.fixture(scope="module")
def tiny_schnell_dir(tmp_path_factory):
    from tests.tiny_pipeline import build_tiny_flux_pipeline

    return build_tiny_flux_pipeline(tmp_path_factory.mktemp("tiny-schnell"), guidance_embeds=False)


@pytest.fixture(scope="module")
def engines(tiny_flux_dir, tiny_schnell_dir, tiny_sd3_dir, tiny_sdxl_dir):
    folders = {"flux": tiny_flux_dir, "schnell": tiny_schnell_dir, "sd3": tiny_sd3_dir, "sdxl": tiny_sdxl_dir}
    return {name: Engine.load(str(folder), EngineConfig(device="cpu", dtype="float32")) for name, folder in folders.items()}


@pytest.fixture(params=BASES)
def engine(request, engines):
    engine = engines[request.param]
    engine.restore()
    yield engine
    engine.restore()


def layers_of(engine) -> list[str]:
    """Attention / MLP projections of the denoiser and of every text encoder the base adapts."""
    chosen = []
    for name, module in engine.live.modules.items():
        component, _, path = name.partition(".")
        targets = DENOISER_TARGETS if component in ("unet", "transformer") else TEXT_TARGETS
        if isinstance(module, torch.nn.Linear) and path.endswith(targets) and not path == "proj_out":
            chosen.append(name)
    return chosen


def lora(engine, name: str, seed: int, **options):
    return random_lora(engine, name, seed, layers=layers_of(engine), magnitude=0.3, **options)


def request(**fields) -> GenerateRequest:
    return GenerateRequest(**{"prompt": "a red circle", "steps": STEPS, "width": SIDE, "height": SIDE, **fields})


def test_components_are_the_bases_own(engines):
    components = {name: sorted({layer.partition(".")[0] for layer in e.live.modules}) for name, e in engines.items()}
    assert components["flux"] == ["text_encoder", "text_encoder_2", "transformer"]
    assert components["sd3"] == ["text_encoder", "text_encoder_2", "text_encoder_3", "transformer"]
    assert components["sdxl"] == ["text_encoder", "text_encoder_2", "unet"]
    assert engines["flux"].guidance_mode == "embedded" and engines["schnell"].guidance_mode == "none"
    native = {name: e.size_of(GenerateRequest(prompt="x")) for name, e in engines.items()}
    assert native["flux"] == (128, 128) and native["sd3"] == (32, 32) and native["sdxl"] == (32, 32)


def test_generate_switch_a_b_a_is_bit_exact_and_restores_w0(engine):
    pristine = {name: module.weight.detach().clone() for name, module in engine.live.modules.items()}
    engine.register("ba", lora(engine, "ba", 1))
    engine.register("bb", lora(engine, "bb", 2))
    base = engine.generate(request(seed=3))[0].pixels
    a1 = engine.generate(request(seed=3, adapters=["ba"]))[0].pixels
    weights_a = {name: module.weight.detach().clone() for name, module in engine.live.modules.items()}
    b = engine.generate(request(seed=3, adapters=["bb"]))[0].pixels
    a2 = engine.generate(request(seed=3, adapters=["ba"]))[0].pixels
    assert np.array_equal(a1, a2)
    assert all(torch.equal(module.weight, weights_a[name]) for name, module in engine.live.modules.items())
    assert np.abs(a1 - base).max() > 0.01 and np.abs(a1 - b).max() > 0.01, "the adapters should change the image"
    engine.restore()
    assert all(torch.equal(module.weight, pristine[name]) for name, module in engine.live.modules.items())
    assert np.array_equal(engine.generate(request(seed=3))[0].pixels, base)


def test_mix_is_w0_plus_weighted_deltas(engine):
    first, second = lora(engine, "ma", 4), lora(engine, "mb", 5, rank=2)
    layer = next(name for name in first.layers() if name.startswith(("transformer.", "unet.")))
    w0 = engine.live.modules[layer].weight.detach().clone()
    engine.activate([first, (second, 0.5)], scale=0.8)
    expected = w0 + 0.8 * (first.delta(layer) + 0.5 * second.delta(layer)).reshape(w0.shape)
    torch.testing.assert_close(engine.live.modules[layer].weight.detach(), expected, rtol=1e-5, atol=1e-6)
    engine.register("ma", first)
    engine.register("mb", second)
    mixed = engine.generate(request(seed=1, adapters=["ma:0.8", "mb:0.4"]))[0]
    assert mixed.parameters.adapters == [("ma", 0.8), ("mb", 0.4)]
    assert np.isfinite(mixed.pixels).all()


def test_per_image_batch_equals_one_by_one(engine):
    engine.register("pa", lora(engine, "pa", 11))
    engine.register("pb", lora(engine, "pb", 12, rank=2))
    entries = ["pa", "none", "pb:0.5", "pa:-0.7"]
    batched = engine.generate(request(seed=20, adapters=entries, per_image=True))
    assert sum(len(m._forward_hooks) for m in engine.live.modules.values()) == 0
    singles = [engine.generate(request(seed=20 + i, adapters=[entry]))[0].pixels for i, entry in enumerate(entries)]
    for i, (image, single) in enumerate(zip(batched, singles)):
        np.testing.assert_allclose(image.pixels, single, atol=2e-4, err_msg=f"image {i} ({entries[i]})")
    assert np.abs(singles[0] - singles[1]).max() > 0.01
    assert [image.parameters.adapters for image in batched] == [[("pa", 1.0)], [], [("pb", 0.5)], [("pa", -0.7)]]


def test_lora_file_by_path_generates_like_the_adapter(engine, tmp_path):
    from studio.formats import save_adapter

    adapter = lora(engine, "filed", 7)
    path = tmp_path / "filed.safetensors"
    save_adapter(adapter, path, format="diffusers")
    from_file = engine.generate(request(seed=2, adapters=[f"{path}:0.7"]))[0]
    direct = engine.generate(request(seed=2, adapters=[(adapter, 0.7)]))[0]
    np.testing.assert_allclose(from_file.pixels, direct.pixels, atol=1e-5)
    assert from_file.parameters.adapters == [("filed", 0.7)]


def test_png_info_reads_back(engine, tmp_path):
    engine.register("pngx", lora(engine, "pngx", 9))
    image = engine.generate(request(seed=4, adapters=["pngx:0.25"], guidance=2.5))[0]
    path = image.save(tmp_path / "out.png")
    back = read_png_parameters(path)
    assert back == image.parameters and back.adapters == [("pngx", 0.25)] and back.sampler == "Euler"
    mode = engine.guidance_mode
    if mode == "embedded":  # FLUX.1-dev: as Forge writes it
        assert back.cfg_scale == 1 and back.extra["Distilled CFG Scale"] == "2.5"
    elif mode == "none":
        assert back.cfg_scale == 1 and "Distilled CFG Scale" not in back.extra
    else:
        assert back.cfg_scale == 2.5


def test_flux_refuses_a_negative_prompt_and_noise_schedulers(engines):
    flux = engines["flux"]
    with pytest.raises(ConfigError, match="negative prompt.*no classifier-free guidance"):
        flux.generate(request(negative_prompt="blurry"))
    for name in ("flux", "sd3"):
        with pytest.raises(ConfigError, match="flow-matching base.*euler"):
            engines[name].generate(request(scheduler="ddim"))
        assert engines[name].generate(request(scheduler="euler"))[0].parameters.sampler == "Euler"
    sd3 = engines["sd3"].generate(request(negative_prompt="blurry"))[0]
    assert sd3.parameters.negative_prompt == "blurry"


def test_estimates_follow_the_base(engines):
    flux = engines["flux"].estimate(request(guidance=3.5, batch=2))
    sd3 = engines["sd3"].estimate(request(guidance=3.5, batch=2))
    assert flux.unet_rows == 2 and sd3.unet_rows == 4  # FLUX: no CFG batch
    bigger = engines["flux"].estimate(request(guidance=3.5, batch=2, width=64, height=64))
    assert bigger.tflop > 3 * flux.tflop


def test_auto_dtype_is_bfloat16_for_flux_and_sd3_on_cuda(monkeypatch, tiny_flux_dir):
    from studio.engine.engine import _family_of

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    config = EngineConfig(device="cuda")
    assert [config.resolved_dtype(f) for f in ("flux1", "sd3", "sdxl", "sd", "")] == [torch.bfloat16] * 2 + [torch.float16] * 3
    assert EngineConfig(device="cpu").resolved_dtype("flux1") == torch.float32
    assert _family_of(str(tiny_flux_dir)) == "flux1" and _family_of("sdxl") == "sdxl" and _family_of("org/name") == ""
