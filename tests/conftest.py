"""Shared fixtures: a tiny pipeline folder built once per session, paths to the shared LoRAs."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("STUDIO_CACHE_DIR", tempfile.mkdtemp(prefix="studio-test-cache-"))  # folder trees: not ~/.cache

# /work/main/tests -> /work/shared; a worktree (/work/wt/NAME/tests) finds the same folder higher up.
SHARED_LORAS = next(
    (p / "shared" / "loras" for p in Path(__file__).resolve().parents[1:] if (p / "shared" / "loras").is_dir()),
    Path(__file__).resolve().parents[1].parent / "shared" / "loras",
)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (run on the device machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory) -> Path:
    """A tiny SD-architecture pipeline folder with random weights (seeded)."""
    from tests.tiny_pipeline import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def shared_loras() -> list[Path]:
    """Real LoRA files written by other people (../shared/loras), if present."""
    if not SHARED_LORAS.is_dir():
        pytest.skip("../shared/loras not present")
    return sorted(SHARED_LORAS.glob("*.safetensors"))


@pytest.fixture(scope="session")
def tiny_flux_dir(tmp_path_factory) -> Path:
    """A tiny FluxPipeline folder (FLUX.1-dev module names, random weights, the world's tokenizer)."""
    from tests.tiny_pipeline import build_tiny_flux_pipeline

    return build_tiny_flux_pipeline(tmp_path_factory.mktemp("tiny-flux"))


@pytest.fixture(scope="session")
def tiny_sd3_dir(tmp_path_factory) -> Path:
    """A tiny StableDiffusion3Pipeline folder (SD3.5-Medium module names, random weights)."""
    from tests.tiny_pipeline import build_tiny_sd3_pipeline

    return build_tiny_sd3_pipeline(tmp_path_factory.mktemp("tiny-sd3"))


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory) -> Path:
    """A tiny StableDiffusionXLPipeline folder (SDXL module names, random weights)."""
    from tests.tiny_pipeline import build_tiny_sdxl_pipeline

    return build_tiny_sdxl_pipeline(tmp_path_factory.mktemp("tiny-sdxl"))
