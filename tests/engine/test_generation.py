"""Generation options, determinism, PNG info, grids, specs and names, thread safety."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from studio.engine import (
    AdapterSpecError, GenerateRequest, ImageParameters, check_name, comparison_grid, parse_parameters, parse_spec,
    read_png_parameters,
)
from studio.engine.schedulers import SCHEDULERS, scheduler_choice
from studio.errors import ConfigError
from tests.engine.conftest import random_lora

STEPS = 3


def request(**fields) -> GenerateRequest:
    return GenerateRequest(**{"prompt": "a blue square", "steps": STEPS, **fields})


def test_same_seed_same_image_and_seeds_differ(engine):
    first = engine.generate(request(seed=5, batch=2))
    again = engine.generate(request(seed=5, batch=2))
    assert np.array_equal(first[0].pixels, again[0].pixels) and np.array_equal(first[1].pixels, again[1].pixels)
    assert np.abs(first[0].pixels - first[1].pixels).max() > 0.05
    single = engine.generate(request(seed=6))[0]
    np.testing.assert_allclose(single.pixels, first[1].pixels, atol=1e-5)  # image i uses seed + i
    assert [image.parameters.seed for image in first] == [5, 6]


def test_switching_between_generations_gives_the_same_images(engine):
    engine.register("ga", random_lora(engine, "ga", 50))
    engine.register("gb", random_lora(engine, "gb", 51))
    a1 = engine.generate(request(adapters=["ga"]))[0].pixels
    engine.generate(request(adapters=["gb"]))
    engine.generate(request(adapters=["ga:0.3", "gb"]))
    a2 = engine.generate(request(adapters=["ga"]))[0].pixels
    assert np.array_equal(a1, a2)


@pytest.mark.parametrize("name", ["ddim", "euler", "euler_a", "dpm++", "pndm", "unipc", "Euler a"])
def test_schedulers_by_name(engine, name):
    image = engine.generate(request(scheduler=name, width=24, height=16))[0]
    assert image.image.size == (24, 16)
    assert image.parameters.sampler == scheduler_choice(name).label
    assert np.isfinite(image.pixels).all()


def test_unknown_scheduler_is_a_clear_error(engine):
    with pytest.raises(ConfigError, match="scheduler 'nope'.*ddim"):
        engine.generate(request(scheduler="nope"))
    assert "lms" in SCHEDULERS


def test_png_parameters_read_back_as_written(engine, tmp_path):
    engine.register("circle style", random_lora(engine, "x", 52))
    image = engine.generate(request(adapters=["circle style:0.8"], negative_prompt="blurry, dark", seed=3, guidance=4))[0]
    path = image.save(tmp_path / "out.png")
    params = read_png_parameters(path)
    assert params == image.parameters
    assert params.adapters == [("circle style", 0.8)]
    assert params.to_text().splitlines()[0] == "a blue square <lora:circle style:0.8>"
    assert params.to_text().splitlines()[1] == "Negative prompt: blurry, dark"
    assert "Steps: 3, Sampler: DDIM, CFG scale: 4, Seed: 3, Size: 16x16" in params.to_text()


def test_infotext_round_trip_of_awkward_values():
    params = ImageParameters(
        prompt="line one\nline two, with comma", negative_prompt="no: colons\nplease", steps=25, sampler="DPM++ 2M Karras",
        cfg_scale=4.5, seed=123456789, width=64, height=48, model="my, model: v2", adapters=[("a", 1.0), ("b-2", -0.25)],
        extra={"Grid": "a | b"},
    )
    assert parse_parameters(params.to_text()) == params
    a1111 = "a cat <lora:x:0.5>\nNegative prompt: dog\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x768, Model hash: abc, Model: sd15"
    parsed = parse_parameters(a1111)
    assert (parsed.prompt, parsed.adapters, parsed.width, parsed.height, parsed.extra) == ("a cat", [("x", 0.5)], 512, 768, {"Model hash": "abc"})


def test_comparison_grid_is_one_same_seed_batch_with_labels(engine, tmp_path):
    engine.register("ca", random_lora(engine, "ca", 53))
    engine.register("cb", random_lora(engine, "cb", 54))
    grid = comparison_grid(request(adapters=["none", "ca", "cb:0.5"], seed=9), engine=engine)
    assert grid.image.size[0] == 2 * 16 and grid.image.size[1] > 2 * 16
    assert grid.parameters.extra["Grid"] == "none | ca | cb 0.5"
    band = (grid.image.size[1] - 2 * 16) // 2  # the label band under each row (long labels wrap in 16 px cells)
    cell = np.asarray(grid.image)[16 + band : 16 + band + 16, :16].astype(float) / 255  # second row starts after a label
    single = engine.generate(request(adapters=["cb:0.5"], seed=9))[0].pixels
    assert np.abs(cell - single).max() <= 2 / 255
    read = read_png_parameters(grid.save(tmp_path / "grid.png"))
    assert read.extra["Grid"] == "none | ca | cb 0.5"


def test_spec_parsing():
    plain, weighted = parse_spec("a.safetensors"), parse_spec("a.safetensors:1")
    assert (plain.target, plain.member, plain.weight) == (weighted.target, weighted.member, weighted.weight)
    spec = parse_spec("../loras/c.safetensors#name one:0.25")
    assert (spec.target, spec.member, spec.weight) == ("../loras/c.safetensors", "name one", 0.25)
    assert parse_spec("x:-1.5e-1").weight == -0.15
    assert parse_spec("weird:name").target == "weird:name"
    for bad in ["", "c.safetensors#", "#x"]:
        with pytest.raises(AdapterSpecError):
            parse_spec(bad)


def test_missing_file_spec_is_a_clear_error(engine, tmp_path):
    with pytest.raises(AdapterSpecError, match="no such file .*missing.safetensors"):
        engine.generate(request(adapters=[str(tmp_path / "missing.safetensors:0.5")]))
    with pytest.raises(AdapterSpecError, match="no such file"):
        engine.generate(request(adapters=["../nowhere/x.safetensors#member"]))


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "a/b", "a\\b", "..", ".hidden", "C:x", "x#y", " pad", "", "a" * 200])
def test_registry_rejects_names_that_are_paths(engine, name):
    with pytest.raises(AdapterSpecError, match="not allowed"):
        engine.register(name, random_lora(engine, "n", 55, layers=[]))


def test_registry_accepts_plain_names():
    for name in ["style_1", "Circle v2.0", "a-b"]:
        assert check_name(name) == name


def test_concurrent_switch_and_generate_is_serialized(engine):
    adapters = {name: random_lora(engine, name, 60 + i) for i, name in enumerate(["t0", "t1", "t2"])}
    for name, adapter in adapters.items():
        engine.register(name, adapter)
    expected = {name: engine.generate(request(adapters=[name]))[0].pixels for name in adapters}
    inside, overlaps = [0], []
    slow = engine.pipe.unet.register_forward_pre_hook(lambda *args: time.sleep(0.002))
    original_run = engine._run

    def watched_run(*args, **kwargs):
        inside[0] += 1
        overlaps.append(inside[0])
        try:
            return original_run(*args, **kwargs)
        finally:
            inside[0] -= 1

    engine._run = watched_run
    results, errors = [], []

    def worker(name: str) -> None:
        try:
            for _ in range(2):
                results.append((name, engine.generate(request(adapters=[name]))[0].pixels))
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(name,)) for name in adapters for _ in range(2)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        slow.remove()
        del engine._run
    assert not errors
    assert max(overlaps) == 1
    assert len(results) == 12
    for name, pixels in results:
        assert np.array_equal(pixels, expected[name]), name


def test_bad_requests_are_config_errors(engine):
    for fields in [{"steps": 0}, {"batch": 0}, {"width": 20}, {"per_image": True}]:
        with pytest.raises(ConfigError):
            engine.generate(request(**fields))
    with pytest.raises(ConfigError):
        engine.mix(42)


def test_text_encoder_only_adapter_changes_the_image(engine):
    layers = [n for n in engine.live.modules if n.startswith("text_encoder.") and n.endswith("v_proj")]
    adapter = random_lora(engine, "te", 70, layers=layers, magnitude=0.8)
    bare = engine.generate(request())[0].pixels
    with_te = engine.generate(request(adapters=[adapter]))[0].pixels
    assert np.abs(bare - with_te).max() > 0.01


@pytest.mark.parametrize("fields, field_name", [
    ({"seed": -1}, "seed"), ({"seed": 2**64}, "seed"), ({"seed": 1.5}, "seed"), ({"steps": 2.5}, "steps"),
    ({"steps": True}, "steps"), ({"batch": 0}, "batch"), ({"scale": float("nan")}, "scale"), ({"guidance": float("inf")}, "guidance"),
    ({"width": 30}, "width"),
])
def test_bad_request_fields_are_refused_with_their_name(engine, fields, field_name):
    with pytest.raises(ConfigError, match=field_name):
        engine.generate(request(**fields))


def test_nan_or_inf_adapter_weights_are_refused_up_front(engine):
    lora = random_lora(engine, "w", 53)
    for weight in (float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="weight must be a finite number"):
            engine.generate(request(adapters=[(lora, weight)]))
    with pytest.raises(AdapterSpecError, match="finite"):
        parse_spec("style.safetensors:nan")
