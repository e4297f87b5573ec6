"""PNG info read-back is exact (issue 13 item 9): every combination of awkward prompt content."""

from __future__ import annotations

import itertools

import pytest

from studio.engine.infotext import ImageParameters, parse_parameters
from studio.errors import FormatError

PROMPTS = [
    "a red circle",
    "a <lora:fake:0.5> tag in the prompt",
    "first line\nNegative prompt: inside the prompt",
    "Negative prompt: at the very start",
    "ends with a line\nSteps: 3, Sampler: x, CFG scale: 1",
    "  padded with spaces  ",
    "",
]
NEGATIVES = ["", "blurry", "two\nlines", "Negative prompt: nested", "<lora:neg:1>"]
ADAPTERS = [[], [("circle style", 0.123456789012345)], [("a", 1.0), ("b-2", -0.25), ("c", 1e-9)], [("odd:name>", 0.3)]]


@pytest.mark.parametrize("prompt,negative,adapters", list(itertools.product(PROMPTS, NEGATIVES, ADAPTERS)))
def test_every_combination_reads_back_exactly(prompt, negative, adapters):
    params = ImageParameters(prompt=prompt, negative_prompt=negative, steps=7, sampler="DPM++ 2M", cfg_scale=4.123456789,
                             seed=2**40 + 1, width=64, height=48, model="world", adapters=adapters)
    assert parse_parameters(params.to_text()) == params


def test_plain_text_stays_a1111_style_when_unambiguous():
    params = ImageParameters(prompt="a cat", negative_prompt="dog", steps=20, sampler="Euler a", cfg_scale=7.0, seed=1,
                             width=512, height=768, model="sd15", adapters=[("x", 0.3333333333333333)])
    text = params.to_text()
    assert text.splitlines()[0] == "a cat <lora:x:0.3333333333333333>" and "Studio" not in text


def test_ambiguous_prompt_carries_the_exact_field():
    params = ImageParameters(prompt="a\nNegative prompt: b", negative_prompt="c")
    assert ", Studio: " in params.to_text().splitlines()[-1]


@pytest.mark.parametrize("text", [
    'a\nSteps: 1, Sampler: x, CFG scale: 1, Seed: 1, Size: 8x8, Model: m, Studio: "{\\"prompt\\": 1}"',
    'a\nSteps: 1, Sampler: "\\q", CFG scale: 1, Seed: 1, Size: 8x8, Model: m',
    'a\nSteps: many, Sampler: x, CFG scale: 1, Seed: 1, Size: 8x8, Model: m',
])
def test_bad_parameter_text_is_a_format_error(text):
    with pytest.raises(FormatError, match="PNG parameters"):
        parse_parameters(text)
