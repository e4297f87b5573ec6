"""The app's forms say what the verbs say: a Train form field shared with `TrainConfig` has its
default, help text and bounds (the issue: --help, the app's form and the recipes show the same words)."""

from __future__ import annotations

import dataclasses

import pytest

from studio.app.forms import TrainForm
from studio.app.wiring import hint
from studio.train import TrainConfig

SHARED = ["family", "steps", "learning_rate", "batch_size", "resolution", "trigger_word", "validation_split",
          "checkpoint_every", "export_format", "export_rank", "seed", "caption_dropout"]


@pytest.mark.parametrize("name", SHARED)
def test_train_form_fields_are_the_configs(name):
    form = {f.name: f for f in dataclasses.fields(TrainForm)}[name]
    config = {f.name: f for f in dataclasses.fields(TrainConfig)}[name]
    assert form.default == config.default and dict(form.metadata) == dict(config.metadata)
    assert hint(TrainForm, name) == config.metadata["help"] != ""


GENERATE_SHARED = {"prompt": "prompt", "negative_prompt": "negative_prompt", "strength": "scale", "seed": "seed", "steps": "steps",
                   "batch": "batch"}


@pytest.mark.parametrize("name", sorted(GENERATE_SHARED))
def test_generate_form_fields_are_the_requests(name):
    """The Generate tab starts where `studio generate` does (the app once drew 20 steps, the CLI 25)."""
    from studio.app.forms import GenerateForm
    from studio.verbs.generate import GenerateRequest

    form = {f.name: f for f in dataclasses.fields(GenerateForm)}[name]
    request = {f.name: f for f in dataclasses.fields(GenerateRequest)}[GENERATE_SHARED[name]]
    assert form.default == request.default and dict(form.metadata) == dict(request.metadata)


def test_a_component_starting_away_from_its_fields_default_is_refused():
    from types import SimpleNamespace

    from studio.app.forms import GenerateForm
    from studio.app.wiring import named

    components = {f.name: SimpleNamespace(value=None) for f in dataclasses.fields(GenerateForm)}
    assert named(GenerateForm, **components)  # nothing to compare: accepted
    components["steps"] = SimpleNamespace(value=20)
    with pytest.raises(ValueError, match=r"GenerateForm.steps: the component starts at 20, the form's default is 25"):
        named(GenerateForm, **components)
