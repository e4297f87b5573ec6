"""The world recipe: typed config from TOML, a tiny end-to-end build on CPU, and resuming."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from safetensors import safe_open

from studio.errors import ConfigError
from studio.events import Done, Message, Progress, Saved
from studio.world.build import build_world
from studio.world.config import WorldConfig, config_from_dict, load_config

REPO = Path(__file__).resolve().parents[2]

TINY = dict(
    only_styles=["noir", "quad"], device="cpu", base_images=192, style_images=32, val_images=8,
    unet_channels=[32, 32, 32], vae_channels=[16, 16, 16], text_hidden=32, vae_steps=6, vae_batch=8,
    base_steps=6, base_batch=8, checkpoint_every=3, lora_steps=4, lora_per_style=4, lora_rank=4, lora_alpha=4.0,
    eval_prompts=2, eval_steps=2, diffusers_copies=["quad"],
)


def test_recipes_parse_into_the_typed_config():
    full = load_config(REPO / "pipelines" / "world.toml")
    quick = load_config(REPO / "pipelines" / "world-quick.toml")
    assert isinstance(full, WorldConfig) and full.out_dir == "assets/world"
    assert quick.out_dir != full.out_dir and quick.base_steps < full.base_steps


@pytest.mark.parametrize("table, needle", [
    ({"base_stepz": 3}, "unknown field(s) ['base_stepz']"),
    ({"base_steps": "many"}, "field 'base_steps' must be int"),
    ({"lora_rank": 0}, "field 'lora_rank' must be positive"),
    ({"device": "tpu"}, "field 'device'"),
    ({"lora_loss_weighting": "snr"}, "field 'lora_loss_weighting' must be one of none, min_snr"),
    ({"lora_min_snr_gamma": 0}, "field 'lora_min_snr_gamma' must be positive"),
])
def test_bad_world_tables_name_the_field(table, needle):
    with pytest.raises(ConfigError) as error:
        config_from_dict(table, "recipe.toml [world]")
    assert "recipe.toml [world]" in str(error.value) and needle in str(error.value)


def test_unknown_only_styles_are_refused(tmp_path):
    config = dataclasses.replace(WorldConfig(**TINY), only_styles=["nope"], out_dir=str(tmp_path / "o"), work_dir=str(tmp_path / "w"))
    with pytest.raises(ConfigError, match="nope"):
        list(build_world(config))


def test_tiny_build_end_to_end_then_resumes(tmp_path):
    config = WorldConfig(**TINY, out_dir=str(tmp_path / "world"), work_dir=str(tmp_path / "work"))
    events = list(build_world(config))
    stages = {e.stage.split(":")[0] for e in events if isinstance(e, Progress)}
    assert {"vae", "base", "zoo", "report"} <= stages
    saved = {e.kind for e in events if isinstance(e, Saved)}
    assert {"data", "vae", "pipeline", "lora", "report"} <= saved
    report = events[-1].result
    assert isinstance(events[-1], Done) and set(report["styles"]) == {"noir", "quad"}
    out = Path(config.out_dir)
    assert (out / "model_index.json").exists() and (out / "loras" / "noir.safetensors").exists()
    assert (out / "loras" / "diffusers" / "quad.safetensors").exists()
    with safe_open(str(out / "loras" / "noir.safetensors"), "pt") as f:
        assert f.metadata()["studio.loss_weighting"] == "none"
    assert not list(Path(config.work_dir).glob("*.ckpt"))  # base and zoo checkpoints go once their results are saved

    from diffusers import StableDiffusionPipeline

    StableDiffusionPipeline.from_pretrained(out, local_files_only=True)

    again = list(build_world(config))  # everything saved: every stage is skipped
    assert not any(isinstance(e, Progress) and e.stage.split(":")[0] in ("vae", "base", "zoo") for e in again)
    skipped = " ".join(e.text for e in again if isinstance(e, Message))
    assert "data: already" in skipped and "vae: already" in skipped and "base: already" in skipped and "already trained" in skipped


def test_changed_lora_settings_retrain_only_the_zoo(tmp_path):
    config = WorldConfig(**{**TINY, "only_styles": ["noir"]}, out_dir=str(tmp_path / "world"), work_dir=str(tmp_path / "work"))
    list(build_world(config))
    changed = dataclasses.replace(config, lora_steps=5)
    events = list(build_world(changed))
    trained = {e.stage.split(":")[0] for e in events if isinstance(e, Progress) and e.stage != "report"}
    assert trained == {"zoo"}


def test_a_build_cut_off_mid_base_resumes_from_its_checkpoint(tmp_path):
    config = WorldConfig(**{**TINY, "only_styles": ["noir"]}, out_dir=str(tmp_path / "world"), work_dir=str(tmp_path / "work"))
    run = build_world(config)
    for event in run:
        if isinstance(event, Progress) and event.stage == "base" and event.step >= 4:
            break  # the checkpoint of step 3 is on disk; stop as a time limit would
    run.close()
    assert not (Path(config.out_dir) / "model_index.json").exists()
    events = list(build_world(config))
    first_base = next(e for e in events if isinstance(e, Progress) and e.stage == "base")
    assert first_base.metrics.get("resumed_from") == 3.0
    assert isinstance(events[-1], Done)


def test_loss_weighting_enters_the_lora_fingerprint_only_when_not_plain():
    from studio.world.build import select_styles
    from studio.world.stages import Stages
    from studio.world.zoo import lora_fingerprint

    def fingerprint(**changes):
        config = dataclasses.replace(WorldConfig(**TINY), **changes)
        stages = Stages(config, select_styles(config))
        return lora_fingerprint(stages, stages.styles[0])

    plain = fingerprint()
    assert fingerprint(lora_min_snr_gamma=2.0) == plain  # gamma only matters to min_snr
    assert fingerprint(lora_loss_weighting="sampler") != plain
    assert fingerprint(lora_loss_weighting="min_snr") != fingerprint(lora_loss_weighting="min_snr", lora_min_snr_gamma=2.0)
