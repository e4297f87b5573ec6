"""Concurrent requests gathered into per-image batches give each caller its own sequential images."""

from __future__ import annotations

import threading
from concurrent.futures import Future

import numpy as np
import pytest

from studio.bases import world_dir
from studio.engine import Batcher, BatcherConfig, GenerateRequest, NonFiniteUpdateError
from studio.errors import ConfigError, StudioError

STEPS = 2


def zoo(name: str) -> str:
    return str(world_dir() / "loras" / f"{name}.safetensors")


def requests() -> list[GenerateRequest]:
    """Four users: different prompts, adapters, weights, seeds; one asks for two images."""
    return [
        GenerateRequest(prompt="a red circle on a white background", adapters=[zoo("noir")], seed=1, steps=STEPS),
        GenerateRequest(prompt="a blue star", adapters=[f"{zoo('mosaic')}:0.7"], seed=2, steps=STEPS, negative_prompt="green"),
        GenerateRequest(prompt="a small yellow square", seed=3, steps=STEPS),
        GenerateRequest(prompt="a green triangle", adapters=[zoo("sepia"), f"{zoo('neon')}:0.5"], seed=4, steps=STEPS, batch=2),
    ]


def submit_from_threads(batcher: Batcher, items: list[GenerateRequest]) -> list[Future]:
    futures: list[Future | None] = [None] * len(items)

    def client(i: int) -> None:
        futures[i] = batcher.submit(items[i])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(items))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return futures  # type: ignore[return-value]


def test_concurrent_requests_in_one_batch_equal_sequential(world_engine):
    sequential = [world_engine.generate(r) for r in requests()]
    batcher = Batcher(world_engine, BatcherConfig(max_images=8), start=False)
    futures = submit_from_threads(batcher, requests())
    batcher.start()  # everything is queued: one batch, whatever the thread timing
    results = [f.result(timeout=120) for f in futures]
    batcher.close()
    assert batcher.batch_sizes == [5]
    for i, (got, want) in enumerate(zip(results, sequential)):
        assert len(got) == len(want)
        for image, reference in zip(got, want):
            np.testing.assert_allclose(image.pixels, reference.pixels, atol=2e-4, err_msg=f"request {i}")
            assert image.parameters == reference.parameters
    assert np.abs(results[0][0].pixels - results[2][0].pixels).max() > 0.05, "adapters should change the images"


def test_incompatible_settings_run_in_separate_batches(world_engine):
    items = [GenerateRequest(prompt="a red circle", adapters=[zoo("noir")], seed=5, steps=STEPS),
             GenerateRequest(prompt="a red circle", adapters=[zoo("noir")], seed=5, steps=STEPS + 1),
             GenerateRequest(prompt="a red circle", adapters=[zoo("mosaic")], seed=6, steps=STEPS)]
    batcher = Batcher(world_engine, start=False)
    futures = [batcher.submit(r) for r in items]
    batcher.start()
    got = [f.result(timeout=120)[0].pixels for f in futures]
    batcher.close()
    assert sorted(batcher.batch_sizes) == [1, 2]
    for image, request in zip(got, items):
        np.testing.assert_allclose(image, world_engine.generate(request)[0].pixels, atol=2e-4)


def test_max_images_splits_batches_in_arrival_order(world_engine):
    items = [GenerateRequest(prompt="a red circle", adapters=[zoo(n)], seed=i, steps=1) for i, n in enumerate(["noir", "mosaic", "sepia"])]
    batcher = Batcher(world_engine, BatcherConfig(max_images=2), start=False)
    futures = [batcher.submit(r) for r in items]
    batcher.start()
    for future in futures:
        assert len(future.result(timeout=120)) == 1
    batcher.close()
    assert batcher.batch_sizes == [2, 1]


def test_a_bad_adapter_weight_fails_only_its_own_request(world_engine):
    good = GenerateRequest(prompt="a red circle", adapters=[zoo("noir")], seed=7, steps=STEPS)
    bad = GenerateRequest(prompt="a red circle", adapters=[f"{zoo('mosaic')}:1e30"], seed=8, steps=STEPS)
    batcher = Batcher(world_engine, start=False)
    futures = [batcher.submit(good), batcher.submit(bad)]
    batcher.start()
    image = futures[0].result(timeout=120)[0]
    with pytest.raises(NonFiniteUpdateError, match="mosaic.*1e\\+30"):
        futures[1].result(timeout=120)
    batcher.close()
    np.testing.assert_allclose(image.pixels, world_engine.generate(good)[0].pixels, atol=2e-4)


def test_bad_requests_are_refused_at_submit(world_engine):
    with Batcher(world_engine) as batcher:
        with pytest.raises(ConfigError, match="guidance"):
            batcher.submit(GenerateRequest(prompt="x", guidance=float("nan"), steps=1))
        with pytest.raises(StudioError, match="weight must be a finite"):
            batcher.submit(GenerateRequest(prompt="x", adapters=[f"{zoo('noir')}:inf"], steps=1))


def test_engine_submit_uses_its_batcher(world_engine):
    request = GenerateRequest(prompt="a blue square", adapters=[zoo("noir")], seed=9, steps=1)
    try:
        got = world_engine.submit(request).result(timeout=120)
    finally:
        world_engine.close()
    np.testing.assert_allclose(got[0].pixels, world_engine.generate(request)[0].pixels, atol=2e-4)
