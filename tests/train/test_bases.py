"""Training on every base: tiny SDXL, FLUX.1-dev and SD3.5 pipelines (random weights), every family.

Each family trains a few steps and its validation loss drops; the exported LoRA file, read back
by ``studio.formats.load_adapter`` and merged by the engine, makes the same image as the
training-time hooks at the same seed; text-encoder LoRAs (SD1.5's CLIP, SDXL's two, FLUX's CLIP)
train and change the encoder's output; options a base cannot honour are refused by name.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from studio.errors import ConfigError
from studio.events import run_to_end
from studio.train import train
from tests.train.helpers import tiny_collection, tiny_config

BASES = {"sdxl": "tiny_sdxl_dir", "flux": "tiny_flux_dir", "sd3": "tiny_sd3_dir"}
RESOLUTION = {"sdxl": 32, "flux": 32, "sd3": 16, "sd": 16}
LR_SCALE = {"sdxl": 3.0}  # the tiny random SDXL UNet learns slowest
STEPS = 4
PROMPT = "a red circle"


@pytest.fixture(scope="module")
def base_dirs(request) -> dict[str, Path]:
    return {name: request.getfixturevalue(fixture) for name, fixture in BASES.items()} | {"sd": request.getfixturevalue("tiny_pipeline_dir")}


@pytest.fixture(scope="module")
def collections(base_dirs, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("collections")
    return {name: tiny_collection(base_dirs[name], folder / f"{name}.safetensors") for name in BASES}


def _cases(collection: Path) -> dict[str, tuple[dict, float]]:
    return {
        "lora": ({"rank": 4, "alpha": 4}, 1e-2),
        "superlora": ({"groups": 4, "rank": 4}, 3e-2),
        "unilora": ({"d": 512, "rank": 4}, 0.3),
        "eigenlora": ({"collection": str(collection), "rank": 4, "k": 8}, 3e-2),
    }


def _config(base_dir: Path, base: str, data: Path, out: Path, family: str, knobs: dict, lr: float, **overrides):
    values = dict(adapter=knobs, learning_rate=lr, steps=STEPS, validation_every=STEPS, resolution=RESOLUTION[base],
                  export_format="kohya", export_rank=64, sample_steps=2)
    values.update(overrides)
    return tiny_config(base_dir, data, out, family, **values)


def hooked_and_engine_images(base_dir: Path, run: Path, resolution: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(base image, image through the training-time hooks, image of the engine with the exported file).

    The hooked adapter is rebuilt from the run's native ``adapter.safetensors`` and config, as
    the trainer attaches it (``studio.engine.patch.Attachment`` on the base's components)."""
    from safetensors.torch import load_file

    from studio.adapters import registry
    from studio.bases import load_pipeline
    from studio.engine import Engine, EngineConfig, GenerateRequest
    from studio.engine.patch import Attachment
    from studio.train import config as config_mod
    from studio.train import session as session_mod
    from studio.train.checkpoint import load_adapter_tensors

    config = config_mod.load(run / "config.toml")
    pipe = load_pipeline(str(base_dir))
    pipe.set_progress_bar_config(disable=True)
    base = session_mod.base_of(pipe)
    family_config = registry.make_config(config.family, session_mod.adapter_knobs(config, base))
    adapter = registry.build_adapter(config.family, family_config, session_mod._tree(config.base, pipe))
    load_adapter_tensors(adapter, load_file(str(run / "adapter.safetensors")), str(run))

    def image() -> np.ndarray:
        generator = torch.Generator().manual_seed(seed)
        return pipe(PROMPT, num_inference_steps=2, guidance_scale=config.sample_guidance, height=resolution, width=resolution,
                    generator=generator, output_type="np").images[0]

    with torch.no_grad():
        plain = image()
        attached = Attachment(session_mod.components(pipe), adapter)
        hooked = image()
        attached.detach()
    engine = Engine.load(str(base_dir), EngineConfig(device="cpu", dtype="float32"))
    lora = next(run.glob("*.lora.safetensors"))
    merged = engine.generate(GenerateRequest(prompt=PROMPT, adapters=[str(lora)], seed=seed, steps=2, guidance=config.sample_guidance,
                                             width=resolution, height=resolution))[0].pixels
    return plain, hooked, merged


def assert_same_image(plain: np.ndarray, hooked: np.ndarray, merged: np.ndarray) -> None:
    """The engine's merged export equals the hooks within float tolerance, and the adapter visibly acts."""
    error, effect = float(np.abs(hooked - merged).max()), float(np.abs(hooked - plain).max())
    assert error < 2e-4, error
    assert effect > 20 * error and effect > 1e-4, (effect, error)


@pytest.mark.parametrize("family", ["lora", "superlora", "unilora", "eigenlora"])
@pytest.mark.parametrize("base", list(BASES))
def test_every_family_trains_on_every_base_and_its_export_applies_like_the_hooks(base, family, base_dirs, collections, style_data, tmp_path):
    knobs, lr = _cases(collections[base])[family]
    out = tmp_path / "run"
    result = run_to_end(train(_config(base_dirs[base], base, style_data, out, family, knobs, lr * LR_SCALE.get(base, 1.0))))
    assert result.status == "done" and result.steps == STEPS
    assert result.validation[STEPS] < 0.99 * result.validation[0], result.validation
    assert result.export_error is not None and result.export_error < 1e-4
    assert_same_image(*hooked_and_engine_images(base_dirs[base], out, RESOLUTION[base]))


TEXT_ENCODERS = {"sd": ["unet", "text_encoder"], "sdxl": ["unet", "text_encoder", "text_encoder_2"], "flux": ["transformer", "text_encoder"]}


TEXT_CASES = {"lora": ({"rank": 4, "alpha": 4}, 3e-2), "superlora": ({"groups": 4, "rank": 4}, 3e-2), "unilora": ({"d": 512, "rank": 4}, 0.3)}


@pytest.mark.parametrize("base,family", [("sd", "lora"), ("sd", "superlora"), ("sd", "unilora"), ("sdxl", "lora"), ("flux", "lora")])
def test_text_encoder_lora_trains_and_changes_the_encoders_output(base, family, base_dirs, style_data, tmp_path):
    from studio.adapters.lora import LoraAdapter
    from studio.bases import load_pipeline
    from studio.bases.conditioning import encode_prompts
    from studio.formats import load_adapter

    out = tmp_path / "run"
    knobs, lr = TEXT_CASES[family]
    knobs = {**knobs, "components": TEXT_ENCODERS[base]}
    result = run_to_end(train(_config(base_dirs[base], base, style_data, out, family, knobs, lr)))
    assert result.status == "done" and result.validation[STEPS] < 0.99 * result.validation[0], result.validation
    lora = load_adapter(next(out.glob("*.lora.safetensors")), str(base_dirs[base]))
    assert isinstance(lora, LoraAdapter)
    owners = {layer.partition(".")[0] for layer in lora.layers()}
    assert owners == set(TEXT_ENCODERS[base])
    pipe = load_pipeline(str(base_dirs[base]))
    before = encode_prompts(pipe, [PROMPT], max_sequence_length=16)
    from studio.engine.patch import merged, component_modules

    modules = {k: v for name in owners - {"unet", "transformer"} for k, v in component_modules(getattr(pipe, name), name).items()}
    text_only = LoraAdapter("text", {k: v for k, v in lora.lora_layers.items() if k in modules})
    with torch.no_grad(), merged(modules, text_only):
        after = encode_prompts(pipe, [PROMPT], max_sequence_length=16)
    changed = after.pooled if base == "flux" else after.sequence  # FLUX's CLIP gives only the pooled projection
    reference = before.pooled if base == "flux" else before.sequence
    assert float((changed - reference).abs().max()) > 1e-4
    assert_same_image(*hooked_and_engine_images(base_dirs[base], out, RESOLUTION[base]))


def test_options_a_base_cannot_honour_are_refused_by_name(base_dirs, style_data, tmp_path):
    flux, sdxl = base_dirs["flux"], base_dirs["sdxl"]
    cases = [
        (flux, "flux", {"loss_weighting": "min_snr"}, {"rank": 2}, "loss_weighting = 'min_snr'.*flow matching"),
        (flux, "flux", {}, {"rank": 2, "components": ["unet"]}, r"components \['unet'\].*denoiser is 'transformer'"),
        (flux, "flux", {}, {"rank": 2, "components": ["transformer", "text_encoder_2"]}, "match no layer of \\['text_encoder_2'\\]"),
        (sdxl, "sdxl", {"timestep_sampling": "logit_normal"}, {"rank": 2}, "timestep_sampling = 'logit_normal' is for flow-matching"),
    ]
    for index, (folder, base, overrides, knobs, message) in enumerate(cases):
        config = _config(folder, base, style_data, tmp_path / f"run{index}", "lora", knobs, 1e-2, **overrides)
        with pytest.raises(ConfigError, match=message):
            run_to_end(train(config))
    from types import SimpleNamespace

    from studio.bases import BASES as FAMILIES
    from studio.train.session import _resolution

    real_flux = SimpleNamespace(vae_scale_factor=8)  # FLUX's VAE scales by 8 and latents pack 2 x 2: multiples of 16
    with pytest.raises(ConfigError, match="resolution = 1000: FLUX.1 with this VAE needs a multiple of 16"):
        _resolution(_config(flux, "flux", style_data, tmp_path / "r", "lora", {}, 1e-2, resolution=1000), real_flux, FAMILIES["flux1"])


def test_flow_training_uses_the_pipelines_own_schedule_and_logit_normal_sampling(base_dirs, style_data, tmp_path):
    """SD3-style shifted schedule: training timesteps are entries of the pipeline scheduler's table."""
    from studio.train import session as session_mod

    config = _config(base_dirs["sd3"], "sd3", style_data, tmp_path / "run", "lora", {"rank": 2}, 1e-2, timestep_sampling="logit_normal")
    from studio.train.data import scan_folder

    run = session_mod.start(config, scan_folder(config.data))
    run.noise_scheduler = type(run.noise_scheduler).from_config(run.noise_scheduler.config, shift=3.0)
    table = run.noise_scheduler.timesteps
    drawn = session_mod.sample_timesteps(run, 4000, torch.Generator().manual_seed(0))
    assert set(drawn.tolist()) <= set(table.tolist())
    sigmas = drawn / 1000
    assert 0.55 < float(sigmas.median()) < 0.9  # logit-normal around 0.5, shifted by 3: 3 * 0.5 / (1 + 2 * 0.5) = 0.75
    loss = session_mod.step_loss(run, 0)
    assert torch.isfinite(loss)


def test_gradient_checkpointing_trains_the_same_steps(base_dirs, style_data, tmp_path):
    """Recomputed activations (diffusers' non-reentrant checkpointing) see the same adapter hooks."""
    results = []
    for index, checkpointing in enumerate((False, True)):
        config = _config(base_dirs["flux"], "flux", style_data, tmp_path / f"run{index}", "superlora", {"groups": 4, "rank": 4}, 3e-2,
                         steps=2, validation_every=2, export_format="none", gradient_checkpointing=checkpointing)
        results.append(run_to_end(train(config)))
    plain, checkpointed = results
    assert plain.losses[2] != plain.losses[1]
    for step in (1, 2):
        assert checkpointed.losses[step] == pytest.approx(plain.losses[step], rel=1e-5)


def test_flux_resume_is_exact(base_dirs, style_data, tmp_path):
    import threading

    from studio.events import Done, Progress

    common = dict(steps=4, checkpoint_every=2, export_format="none", timestep_sampling="logit_normal")
    straight = run_to_end(train(_config(base_dirs["flux"], "flux", style_data, tmp_path / "a", "lora", {"rank": 2}, 1e-2, **common)))
    config = _config(base_dirs["flux"], "flux", style_data, tmp_path / "b", "lora", {"rank": 2}, 1e-2, **common)
    stop = threading.Event()
    for event in train(config, stop=stop):
        if isinstance(event, Progress) and event.step == 1:
            stop.set()
        if isinstance(event, Done):
            assert event.result.status == "stopped"
    resumed = run_to_end(train(config, resume_dir=tmp_path / "b"))
    assert [resumed.losses[s] for s in range(1, 5)] == [straight.losses[s] for s in range(1, 5)]


def test_flux_schnell_trains_without_a_guidance_embedding(style_data, tmp_path):
    from tests.tiny_pipeline import build_tiny_flux_pipeline

    folder = build_tiny_flux_pipeline(tmp_path / "schnell", guidance_embeds=False)
    knobs, lr = _cases(Path())["lora"]
    result = run_to_end(train(_config(folder, "flux", style_data, tmp_path / "run", "lora", knobs, lr, export_format="none")))
    assert result.status == "done" and result.validation[STEPS] < 0.99 * result.validation[0], result.validation


def test_sdxl_caption_dropout_trains_on_the_zeros_its_sampler_uses_for_an_empty_prompt(base_dirs, style_data, tmp_path):
    """SDXL pipelines condition an empty prompt on zeros (``force_zeros_for_empty_prompt``): the
    dropped rows' sequence and pooled embeddings are zeros there, the kept rows their own captions'."""
    from studio.train import session as session_mod
    from studio.train.data import scan_folder

    config = _config(base_dirs["sdxl"], "sdxl", style_data, tmp_path / "run", "lora", {"rank": 2}, 1e-2, caption_dropout=0.5)
    run = session_mod.start(config, scan_folder(config.data))
    assert session_mod.zeros_for_empty(run.pipe)
    items, dropped = [0, 1, 2, 3], [True, False, True, False]
    mixed, plain = session_mod.conditioning_of(run, run.train, items, dropped), session_mod.conditioning_of(run, run.train, items)
    assert set(mixed) >= {"sequence", "pooled"}
    for key in mixed:
        for row, drop in enumerate(dropped):
            if drop:
                assert not mixed[key][row].any() and plain[key][row].any()
            else:
                assert torch.equal(mixed[key][row], plain[key][row])
    assert torch.isfinite(session_mod.step_loss(run, 0))
