"""The one loop: every family learns, resume is exact, NaN is survived, outputs are written."""

from __future__ import annotations

import json
import threading

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from studio.errors import ConfigError
from studio.events import Done, Message, Progress, Sample, Saved, run_to_end
from studio.train import loop, train
from tests.train.helpers import FAMILIES, family_of, tiny_config


def _config(tiny_pipeline_dir, style_data, out, case, family_cases, **overrides):
    knobs, lr = family_cases[case]
    values = dict(adapter=knobs, learning_rate=lr)
    values.update(overrides)
    return tiny_config(tiny_pipeline_dir, style_data, out, family_of(case), **values)


@pytest.mark.parametrize("case", FAMILIES)
def test_validation_loss_drops(case, tiny_pipeline_dir, style_data, tmp_path, family_cases):
    config = _config(tiny_pipeline_dir, style_data, tmp_path / "run", case, family_cases, steps=30)
    result = run_to_end(train(config))
    assert result.status == "done" and result.steps == 30
    assert result.validation[30] < 0.96 * result.validation[0], result.validation


@pytest.mark.parametrize("case", ["lora", "superlora_tucker", "unilora", "eigenlora"])
def test_resume_is_exact(case, tiny_pipeline_dir, style_data, tmp_path, family_cases):
    common = dict(steps=8, checkpoint_every=4, grad_accumulation=2, lr_warmup_steps=2, lr_schedule="cosine")
    straight = run_to_end(train(_config(tiny_pipeline_dir, style_data, tmp_path / "a", case, family_cases, **common)))
    config = _config(tiny_pipeline_dir, style_data, tmp_path / "b", case, family_cases, **common)
    stop = threading.Event()
    for event in train(config, stop=stop):
        if isinstance(event, Progress) and event.step == 3:
            stop.set()
        if isinstance(event, Done):
            assert event.result.status == "stopped" and event.result.steps == 3
    resumed = run_to_end(train(config, resume_dir=tmp_path / "b"))
    assert resumed.status == "done"
    assert [resumed.losses[s] for s in range(1, 9)] == [straight.losses[s] for s in range(1, 9)]
    a, b = load_file(str(tmp_path / "a" / "adapter.safetensors")), load_file(str(tmp_path / "b" / "adapter.safetensors"))
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_injected_nan_restores_last_good_checkpoint(tiny_pipeline_dir, style_data, tmp_path, family_cases, monkeypatch):
    original = loop.loss_of

    def poisoned(run, micro_step):
        loss = original(run, micro_step)
        return loss * float("nan") if micro_step == 6 else loss

    monkeypatch.setattr(loop, "loss_of", poisoned)
    config = _config(tiny_pipeline_dir, style_data, tmp_path / "run", "lora", family_cases, steps=10, checkpoint_every=4)
    events = list(train(config))
    result = events[-1].result
    assert result.status == "diverged" and result.steps == 4
    errors = [e.text for e in events if isinstance(e, Message) and e.level == "error"]
    assert errors and "step 7" in errors[0] and "restored the last good checkpoint (step 4" in errors[0]
    saved = load_file(str(tmp_path / "run" / "checkpoints" / "step-000004" / "adapter.safetensors"))
    final = load_file(str(tmp_path / "run" / "adapter.safetensors"))
    assert all(torch.equal(saved[key], final[key]) for key in saved)
    assert max(result.losses) == 4


def test_rising_validation_loss_stops_the_run_and_exports_nothing(tiny_pipeline_dir, style_data, tmp_path, family_cases, monkeypatch):
    """The divergence guard: validation above divergence_factor x its start twice in a row."""
    from studio.train import session as session_mod

    values = iter([1.0, 1.2, 1.6, 1.7, 1.8, 1.9, 2.0, 2.1, 2.2, 2.3, 2.4])
    monkeypatch.setattr(session_mod, "validation_loss", lambda run: next(values))
    config = _config(tiny_pipeline_dir, style_data, tmp_path / "run", "lora", family_cases, steps=40, validation_every=4,
                     learning_rate=0.5, export_format="kohya", checkpoint_every=1000)
    events = list(train(config))
    result = events[-1].result
    assert result.status == "diverged" and result.steps == 0 and result.lora_path is None
    errors = [e.text for e in events if isinstance(e, Message) and e.level == "error"]
    assert len(errors) == 1 and "step 12" in errors[0] and "learning rate 0.5" in errors[0] and "restored the initial adapter" in errors[0]
    assert max(e.step for e in events if isinstance(e, Progress)) == 12
    assert not list((tmp_path / "run").glob("*.lora.safetensors"))
    final = load_file(str(tmp_path / "run" / "adapter.safetensors"))
    assert all(float(t.abs().max()) == 0 for k, t in final.items() if k.startswith("up."))  # B back to its zero start


def test_resume_with_changed_config_is_refused_with_a_diff(tiny_pipeline_dir, style_data, tmp_path, family_cases):
    config = _config(tiny_pipeline_dir, style_data, tmp_path / "run", "lora", family_cases, steps=2)
    run_to_end(train(config))
    changed = _config(tiny_pipeline_dir, style_data, tmp_path / "run", "lora", family_cases, steps=2, learning_rate=0.5,
                      adapter={"rank": 8, "alpha": 4})
    with pytest.raises(ConfigError) as error:
        run_to_end(train(changed, resume_dir=tmp_path / "run"))
    assert "learning_rate: 0.003 -> 0.5" in str(error.value) and "adapter.rank: 4 -> 8" in str(error.value)
    with pytest.raises(ConfigError, match="already holds a run"):
        run_to_end(train(config))


def test_outputs_samples_metadata_and_export(tiny_pipeline_dir, style_data, tmp_path, family_cases):
    config = _config(tiny_pipeline_dir, style_data, tmp_path / "run", "superlora", family_cases, steps=4,
                     sample_every=2, sample_steps=2, sample_seeds=[1, 2], checkpoint_every=2, keep_checkpoints=1,
                     trigger_word="zxq style", tensorboard=True)
    events = list(train(config))
    out = tmp_path / "run"
    samples = [e for e in events if isinstance(e, Sample)]
    assert [s.label for s in samples] == ["base", "base", "", "", "", ""]  # the baseline (no adapter) first
    assert [s.step for s in samples] == [0, 0, 2, 2, 4, 4] and samples[0].prompt.startswith("zxq style, a red")
    assert len(list((out / "samples").glob("step-*.png"))) == 4 and len(list((out / "samples").glob("base-*.png"))) == 2
    assert [p.name for p in (out / "checkpoints").glob("step-*")] == ["step-000004"]
    assert (out / "config.toml").exists() and list((out / "tensorboard").iterdir())
    rows = (out / "loss.csv").read_text().splitlines()
    assert rows[0] == "step,loss,lr,val_loss" and len(rows) == 6
    progress = [e for e in events if isinstance(e, Progress)]
    assert [p.step for p in progress] == [1, 2, 3, 4] and {"steps_per_s", "eta_s"} <= set(progress[0].metrics)
    with safe_open(str(out / "adapter.safetensors"), "pt") as handle:
        meta = handle.metadata()
    assert meta["studio.family"] == "superlora" and json.loads(meta["studio.adapter"])["groups"] == 4
    assert meta["studio.trigger_word"] == "zxq style" and meta["ss_network_dim"] == "4" and meta["ss_steps"] == "4"
    assert meta["modelspec.trigger_phrase"] == "zxq style"  # what LoRA managers show as the trigger
    assert any(isinstance(e, Saved) and e.kind == "adapter" for e in events)
    from studio.collection import load_collection

    assert load_collection([out / "adapter.safetensors"], base=str(tiny_pipeline_dir)).infos[0].trigger_words == ["zxq style"]


def test_crash_during_checkpoint_save_keeps_the_last_good_one(tiny_pipeline_dir, style_data, tmp_path, family_cases, monkeypatch):
    from studio.train import checkpoint

    original, calls = checkpoint.save_safetensors, []

    def failing(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 3:  # adapter file of the second checkpoint
            raise OSError("disk full")
        return original(tensors, path, metadata)

    monkeypatch.setattr(checkpoint, "save_safetensors", failing)
    config = _config(tiny_pipeline_dir, style_data, tmp_path / "run", "lora", family_cases, steps=6, checkpoint_every=2)
    with pytest.raises(OSError, match="disk full"):
        run_to_end(train(config))
    monkeypatch.setattr(checkpoint, "save_safetensors", original)
    folder = tmp_path / "run" / "checkpoints"
    assert checkpoint.latest(folder).name == "step-000002"
    assert sorted(p.name for p in folder.iterdir()) == ["latest", "step-000002"]
    resumed = run_to_end(train(config, resume_dir=tmp_path / "run"))
    assert resumed.status == "done" and resumed.steps == 6


def test_resume_refuses_changed_training_data(tiny_pipeline_dir, style_data, tmp_path, family_cases):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(style_data, data)
    config = _config(tiny_pipeline_dir, data, tmp_path / "run", "lora", family_cases, steps=4, checkpoint_every=2)
    stop = threading.Event()
    for event in train(config, stop=stop):
        if isinstance(event, Progress) and event.step == 2:
            stop.set()
    first = sorted(data.glob("*.txt"))[0]
    first.write_text("a different caption")
    with pytest.raises(ConfigError, match="the training data changed since the run started: changed 1"):
        run_to_end(train(config, resume_dir=tmp_path / "run"))


@pytest.mark.parametrize("device, cudnn_inside", [("cuda", False), ("cpu", True)])
def test_training_steps_leave_cudnn_attention_out_on_cuda(device, cudnn_inside):
    """torch 2.11's cuDNN attention crashed FLUX backward on the H200: a CUDA training step runs without it,
    and the process-wide flags are restored afterwards (generation keeps torch's own choice)."""
    from studio.train.session import training_attention

    before = torch.backends.cuda.cudnn_sdp_enabled()
    with training_attention(torch.device(device)):
        assert torch.backends.cuda.cudnn_sdp_enabled() is (cudnn_inside and before)
        assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.math_sdp_enabled()
    assert torch.backends.cuda.cudnn_sdp_enabled() is before


def test_validation_runs_without_autograd(tiny_pipeline_dir, style_data, tmp_path, family_cases, monkeypatch):
    """The validation loss is measured, not trained on: no autograd graph is kept for it (memory on a big base)."""
    from studio.train import validation as validation_mod

    real, modes = validation_mod.fixed_draws_loss, []

    def recording(*args, **kwargs):
        modes.append(torch.is_grad_enabled())
        return real(*args, **kwargs)

    monkeypatch.setattr(validation_mod, "fixed_draws_loss", recording)
    result = run_to_end(train(_config(tiny_pipeline_dir, style_data, tmp_path / "run", "lora", family_cases, steps=2)))
    assert result.status == "done" and modes and not any(modes)


def test_caption_dropout_trains_those_rows_on_the_empty_caption(tiny_pipeline_dir, style_data, tmp_path):
    """kohya's caption_dropout_rate: the dropped rows' conditioning is exactly the empty caption's, the
    others keep their own; the draw is seeded per step and leaves the noise and timesteps alone."""
    import torch

    from studio.train import session as session_mod
    from studio.train.data import scan_folder

    config = tiny_config(tiny_pipeline_dir, style_data, tmp_path / "run", caption_dropout=0.5, steps=4)
    run = session_mod.start(config, scan_folder(config.data))
    items = list(range(min(8, len(run.train.captions))))
    dropped = [i % 2 == 0 for i in items]
    mixed = session_mod.conditioning_of(run, run.train, items, dropped)
    plain = session_mod.conditioning_of(run, run.train, items)
    empty = session_mod._cached_conditioning(run.conditioner, [""])["sequence"][0].to(mixed["sequence"].dtype)
    for row, drop in enumerate(dropped):
        if drop:
            assert torch.equal(mixed["sequence"][row].cpu(), empty)
            assert not torch.equal(plain["sequence"][row].cpu(), empty)
        else:
            assert torch.equal(mixed["sequence"][row], plain["sequence"][row])
    draws = [session_mod.caption_dropped(config, step, 64, 0) for step in range(20)]
    share = sum(map(sum, draws)) / (20 * 64)
    assert 0.4 < share < 0.6 and draws[0] == session_mod.caption_dropped(config, 0, 64, 0) and draws[0] != draws[1]
    off = tiny_config(tiny_pipeline_dir, style_data, tmp_path / "off", steps=4)
    assert session_mod.caption_dropped(off, 0, 64, 0) == [False] * 64
