"""Train configs: TOML in and out, unknown keys named, diffs for resume."""

from __future__ import annotations

import pytest

from studio.adapters.registry import families, make_config
from studio.errors import ConfigError
from studio.train import config as config_mod


def test_toml_round_trip(tmp_path):
    text = """
base = "world"
data = "data/style"
output_dir = "runs/a"
steps = 100
sample_prompts = ["zxq, a red circle"]
trigger_word = "zxq"

[adapter]
family = "superlora"
groups = 4
targets = ["to_q", "to_v"]
"""
    (tmp_path / "a.toml").write_text(text)
    config = config_mod.load(tmp_path / "a.toml")
    assert config.family == "superlora" and config.adapter == {"groups": 4, "targets": ["to_q", "to_v"]}
    (tmp_path / "b.toml").write_text(config_mod.dumps(config))
    again = config_mod.load(tmp_path / "b.toml")
    assert again == config and config_mod.diff(config, again) == []
    knobs = make_config(config.family, config.adapter)
    assert knobs.groups == 4 and knobs.targets == ("to_q", "to_v")


def test_bad_keys_are_named(tmp_path):
    (tmp_path / "a.toml").write_text('base = "w"\ndata = "d"\noutput_dir = "o"\nstepz = 3\n')
    with pytest.raises(ConfigError, match="stepz"):
        config_mod.load(tmp_path / "a.toml")
    (tmp_path / "b.toml").write_text('data = "d"\n')
    with pytest.raises(ConfigError, match="base"):
        config_mod.load(tmp_path / "b.toml")
    with pytest.raises(ConfigError, match="mixed_precision"):
        config_mod.TrainConfig("w", "d", "o", mixed_precision="fp8")
    with pytest.raises(ConfigError, match="grups"):
        make_config("superlora", {"grups": 2})
    with pytest.raises(ConfigError, match="known families"):
        make_config("dora", {})


def test_every_family_is_in_the_table():
    assert {"lora", "superlora", "unilora", "eigenlora"} <= set(families())


def test_diff_lists_changes():
    a = config_mod.TrainConfig("w", "d", "o", adapter={"rank": 4}, steps=500)
    b = config_mod.TrainConfig("w", "d", "elsewhere", adapter={"rank": 8}, steps=7)
    assert config_mod.diff(a, b) == ["adapter.rank: 4 -> 8", "steps: 500 -> 7"]


@pytest.mark.parametrize("field, value, words", [
    ("steps", 2.5, "expected a whole number"),
    ("steps", True, "expected a whole number, got bool"),
    ("checkpoint_every", -1, "must be >= 0"),
    ("sample_prompts", "a red circle", "expected a list"),
    ("lr_warmup_steps", -3, "must be >= 0"),
    ("learning_rate", "1e-3", "expected a number, got str"),
    ("learning_rate", float("nan"), "expected a finite number"),
    ("validation_split", 1.5, "must be <= 0.9"),
    ("resolution", 63, "must be a multiple of 8"),
    ("loss_weighting", "snr", "expected one of"),
    ("family", "dora", "adapter family 'dora' is not known"),
])
def test_every_field_is_checked_by_type_and_bound(field, value, words):
    """The hardening issue's item 8: wrong types and bounds are refused by field name, never run."""
    with pytest.raises(ConfigError) as error:
        config_mod.TrainConfig("world", "data", "out", **{field: value})
    assert words in str(error.value) and (field in str(error.value) or field == "family")


def test_family_defaults_fill_steps_batch_and_learning_rate():
    from studio.adapters import registry

    for name, family in registry.families().items():
        config = config_mod.TrainConfig("world", "data", "out", family=name)
        assert (config.steps, config.batch_size, config.learning_rate) == (
            family.defaults.steps, family.defaults.batch_size, family.defaults.learning_rate)
    assert config_mod.TrainConfig("world", "data", "out", learning_rate=5e-4).learning_rate == 5e-4


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_timestep_weights_follow_the_prediction_type(prediction):
    import torch
    from diffusers import DDPMScheduler

    from studio.train.session import timestep_weights

    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type=prediction)
    t = torch.tensor([0, 500, 999])
    a = scheduler.alphas_cumprod[t].float()
    snr = (a / (1 - a)).clamp(max=1000)
    sampler = timestep_weights(scheduler, t, "sampler")
    if prediction == "epsilon":  # an error in the noise is amplified 1/sqrt(SNR) in the clean image
        assert torch.allclose(sampler, snr.rsqrt().clamp(min=1)) and float(sampler[-1]) > 100
        assert torch.allclose(timestep_weights(scheduler, t, "min_snr", 5.0), snr.clamp(max=5) / snr)
    else:  # an error in v is never amplified
        assert torch.equal(sampler, torch.ones(3))
        assert torch.allclose(timestep_weights(scheduler, t, "min_snr", 5.0), snr.clamp(max=5) / (snr + 1))
        assert torch.allclose(timestep_weights(scheduler, t, "debiased"), 1 / (snr + 1))


def test_max_loss_weight_caps_the_sampler_weights_and_zero_leaves_them():
    import torch
    from diffusers import DDPMScheduler

    from studio.train.session import timestep_weights

    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    t = torch.tensor([0, 300, 600, 999])
    free, capped = timestep_weights(scheduler, t, "sampler"), timestep_weights(scheduler, t, "sampler", cap=4.0)
    assert float(free.max()) > 100 and torch.equal(capped, free.clamp(max=4.0)) and float(capped.max()) == 4.0
    assert torch.equal(timestep_weights(scheduler, t, "sampler", cap=0.0), free)
    assert config_mod.TrainConfig("world", "data", "out").max_loss_weight == 0.0
