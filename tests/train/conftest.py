"""Fixtures for training tests: one thread (the CPU is shared), a style set, a tiny collection."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.threads import one_cpu_thread  # noqa: F401  (autouse here)
from tests.train.helpers import style_folder, tiny_collection


@pytest.fixture(scope="session")
def style_data(tmp_path_factory) -> Path:
    return style_folder(tmp_path_factory.mktemp("style") / "data", 12)


@pytest.fixture(scope="session")
def collection_path(tmp_path_factory, tiny_pipeline_dir) -> Path:
    return tiny_collection(tiny_pipeline_dir, tmp_path_factory.mktemp("collection") / "zoo.safetensors")


@pytest.fixture
def family_cases(collection_path) -> dict[str, tuple[dict, float]]:
    """Family -> (knobs, learning rate) that learn within a few dozen tiny steps."""
    return {
        "lora": ({"rank": 4, "alpha": 4}, 3e-3),
        "superlora": ({"groups": 4, "rank": 4}, 1e-2),
        "superlora_tucker": ({"groups": 2, "splits": 2, "order": 3, "rho": 0.5, "shuffle": True, "rank": 4}, 1e-2),
        "unilora": ({"d": 512, "rank": 4}, 2e-2),
        "eigenlora": ({"collection": str(collection_path), "rank": 4, "k": 8}, 1e-2),
    }
