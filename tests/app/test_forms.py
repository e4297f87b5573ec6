"""The app's forms say what the verbs say: a Train form field shared with `TrainConfig` has its
default, help text and bounds (the issue: --help, the app's form and the recipes show the same words)."""

from __future__ import annotations

import dataclasses

import pytest

from studio.app.forms import TrainForm
from studio.app.wiring import hint
from studio.train import TrainConfig

SHARED = ["family", "steps", "learning_rate", "batch_size", "resolution", "trigger_word", "validation_split",
          "checkpoint_every", "export_format", "export_rank", "seed"]


@pytest.mark.parametrize("name", SHARED)
def test_train_form_fields_are_the_configs(name):
    form = {f.name: f for f in dataclasses.fields(TrainForm)}[name]
    config = {f.name: f for f in dataclasses.fields(TrainConfig)}[name]
    assert form.default == config.default and dict(form.metadata) == dict(config.metadata)
    assert hint(TrainForm, name) == config.metadata["help"] != ""
