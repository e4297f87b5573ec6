"""App test fixtures: a zoo of LoRA files for the tiny pipeline, and a running studio server."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.ports import free_port

ZOO_SIZE = 4


def write_zoo(pipeline_dir: Path, folder: Path, count: int = ZOO_SIZE, rank: int = 4) -> Path:
    """``count`` kohya LoRA files with visible effect on the tiny pipeline's attention layers."""
    from studio.adapters.lora import LoraAdapter, LoraLayer
    from studio.adapters.registry import select_layers
    from studio.bases import module_tree
    from studio.formats import save_adapter

    tree = module_tree(str(pipeline_dir))
    generator = torch.Generator().manual_seed(5)
    folder.mkdir(parents=True, exist_ok=True)
    for n in range(count):
        layers = {}
        for layer in select_layers(tree):
            out, inn = tree.modules[layer].weight_shape[:2]
            layers[layer] = LoraLayer(torch.randn(rank, inn, generator=generator) * 0.3, torch.randn(out, rank, generator=generator) * 0.3, float(rank))
        save_adapter(LoraAdapter(f"style{n}", layers, {"ss_training_comment": f"style{n}"}, base_arch=tree.arch), folder / f"style{n}.safetensors")
    return folder


@pytest.fixture(scope="session")
def tiny_zoo(tiny_pipeline_dir, tmp_path_factory) -> Path:
    return write_zoo(tiny_pipeline_dir, tmp_path_factory.mktemp("zoo"))


@pytest.fixture(scope="session")
def app_config(tiny_pipeline_dir, tiny_zoo, tmp_path_factory):
    from studio.app.services import AppConfig

    return AppConfig(base=str(tiny_pipeline_dir), workspace=tmp_path_factory.mktemp("workspace"), zoo=tiny_zoo,
                     device="cpu", dtype="float32", max_file_size=2 << 20)


@pytest.fixture(scope="session")
def running_app(app_config):
    """The studio served on 127.0.0.1 on a free port, in this process (one CPU thread for torch)."""
    from studio.app.server import start

    torch.set_num_threads(1)
    running = start(app_config, "127.0.0.1", free_port())
    yield running
    running.close()


@pytest.fixture(scope="session")
def client(running_app):
    from gradio_client import Client

    return Client(running_app.url, verbose=False)
