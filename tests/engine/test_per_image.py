"""Several adapters in one batch equal the images generated one by one with the same seeds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from studio.engine import GenerateRequest
from studio.engine.batched import path_kind
from tests.engine.conftest import attention_layers, random_lora, shared_collection

STEPS = 4


def one_by_one(engine, entries: list[str], seeds: list[int]) -> list[np.ndarray]:
    return [
        engine.generate(GenerateRequest(prompt="a red circle", adapters=[entry], seed=seed, steps=STEPS))[0].pixels
        for entry, seed in zip(entries, seeds)
    ]


def hooks_left(engine) -> int:
    return sum(len(module._forward_hooks) for module in engine.live.modules.values())


def test_per_image_batch_of_loras_matches_one_by_one(engine):
    convs = [n for n, m in engine.live.modules.items() if isinstance(m, torch.nn.Conv2d) and ".resnets.0.conv1" in n][:2]
    engine.register("pa", random_lora(engine, "pa", 21, layers=attention_layers(engine) + convs))
    engine.register("pb", random_lora(engine, "pb", 22, rank=2))
    engine.register("pc", random_lora(engine, "pc", 23, layers=attention_layers(engine, text_encoder=False)[:6], rank=8))
    entries = ["pa", "pb:0.5", "none", "pc", "pa:0.3"]
    request = GenerateRequest(prompt="a red circle", adapters=entries, per_image=True, seed=10, steps=STEPS)
    batched = engine.generate(request)
    assert hooks_left(engine) == 0
    singles = one_by_one(engine, entries, [10 + i for i in range(len(entries))])
    for i, (image, single) in enumerate(zip(batched, singles)):
        np.testing.assert_allclose(image.pixels, single, atol=2e-4, err_msg=f"image {i} ({entries[i]})")
    assert batched[1].parameters.adapters == [("pb", 0.5)]
    assert batched[2].parameters.adapters == []
    different = np.abs(singles[0] - singles[2]).max()
    assert different > 0.05, "the adapters should change the images"


def test_shared_basis_collection_takes_the_shared_path_and_matches(engine):
    members = shared_collection(engine, 3)
    for member in members:
        engine.register(member.name, member)
    layer = members[0].layers()[0]
    assert path_kind(layer, members) == "shared"
    entries = ["member0", "member1", "member2:0.5", "member0:-1"]
    request = GenerateRequest(prompt="a red circle", adapters=entries, per_image=True, seed=3, steps=STEPS)
    batched = engine.generate(request)
    singles = one_by_one(engine, entries, [3, 4, 5, 6])
    for i, (image, single) in enumerate(zip(batched, singles)):
        np.testing.assert_allclose(image.pixels, single, atol=2e-4, err_msg=f"image {i} ({entries[i]})")
    assert hooks_left(engine) == 0


def test_mixed_families_fall_back_to_factors(engine):
    members = shared_collection(engine, 1, seed=5)
    lora = random_lora(engine, "l", 30)
    assert path_kind(members[0].layers()[0], [members[0], lora]) == "factors"


def test_per_image_needs_one_entry_per_image(engine):
    from studio.errors import ConfigError

    with pytest.raises(ConfigError, match="per-image"):
        engine.generate(GenerateRequest(prompt="x", adapters=["none", "none"], per_image=True, batch=3, steps=1))


def test_compressed_collection_spec_generates_like_its_exported_lora(engine, tmp_path):
    from studio.subspace import compress_sources, held_sources

    loras = [random_lora(engine, f"c{i}", 90 + i, layers=attention_layers(engine, text_encoder=False)) for i in range(3)]
    path = tmp_path / "coll.safetensors"
    compress_sources(held_sources(loras), path, k=8, base_id="tiny")
    from studio.subspace.collection import CompressedCollection

    exported = CompressedCollection.load(path).export("c1")
    via_spec = engine.generate(GenerateRequest(prompt="a red circle", adapters=[f"{path}#c1:0.7"], seed=2, steps=STEPS))[0]
    via_lora = engine.generate(GenerateRequest(prompt="a red circle", adapters=[(exported, 0.7)], seed=2, steps=STEPS))[0]
    np.testing.assert_allclose(via_spec.pixels, via_lora.pixels, atol=2e-4)
    assert via_spec.parameters.adapters == [("c1", 0.7)]
    entries = [f"{path}#c0", f"{path}#c1:0.7", f"{path}#c2"]
    batched = engine.generate(GenerateRequest(prompt="a red circle", adapters=entries, per_image=True, seed=1, steps=STEPS))
    np.testing.assert_allclose(batched[1].pixels, via_spec.pixels, atol=2e-4)  # image 1: seed 1 + 1


def test_delta_only_and_factor_adapters_in_one_batch_match_one_by_one(engine):
    from tests.engine.conftest import DeltaOnlyAdapter

    layers = attention_layers(engine)
    lora = random_lora(engine, "pd_lora", 24, layers=layers[:8])
    dense = DeltaOnlyAdapter("pd_dense", {layer: random_lora(engine, "x", 25, layers=[layer]).delta(layer) for layer in layers[4:12]})
    engine.register("pd_lora", lora)
    engine.register("pd_dense", dense)
    entries = ["pd_lora", "pd_dense:0.8", "none"]
    batched = engine.generate(GenerateRequest(prompt="a red circle", adapters=entries, per_image=True, seed=20, steps=STEPS))
    singles = one_by_one(engine, entries, [20, 21, 22])
    for i, (image, single) in enumerate(zip(batched, singles)):
        np.testing.assert_allclose(image.pixels, single, atol=2e-4, err_msg=f"image {i} ({entries[i]})")
    assert np.abs(singles[1] - singles[2]).max() > 0.02
