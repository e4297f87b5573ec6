"""Engine test fixtures: one engine on the tiny pipeline, random LoRAs and shared-basis adapters."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import Tensor

from studio.adapters.base import AdapterBase
from studio.adapters.lora import LoraAdapter, LoraLayer
from tests.threads import one_cpu_thread  # noqa: F401  (autouse here)

ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")


@pytest.fixture(scope="session")
def session_engine(tiny_pipeline_dir):
    from studio.engine import Engine, EngineConfig

    return Engine.load(str(tiny_pipeline_dir), EngineConfig(device="cpu", dtype="float32"))


@pytest.fixture(scope="session")
def world_engine():
    """The embedded world pipeline on the CPU in float32 (skipped when assets/world is missing)."""
    from studio.bases import world_dir
    from studio.engine import Engine, EngineConfig

    if not (world_dir() / "model_index.json").is_file():
        pytest.skip("assets/world is not built")
    return Engine.load("world", EngineConfig(device="cpu", dtype="float32"))


@pytest.fixture
def engine(session_engine):
    """The shared tiny engine, pristine at the start of each test (generate leaves adapters merged)."""
    session_engine.restore()
    yield session_engine
    session_engine.restore()


def attention_layers(engine, text_encoder: bool = True) -> list[str]:
    names = [n for n in engine.live.modules if n.startswith("unet.") and n.endswith(ATTENTION)]
    if text_encoder:
        names += [n for n in engine.live.modules if n.startswith("text_encoder.") and n.endswith(("q_proj", "k_proj", "v_proj", "out_proj"))]
    return names


def random_lora(engine, name: str, seed: int, layers: list[str] | None = None, rank: int = 4, alpha: float = 2.0,
                magnitude: float = 0.4) -> LoraAdapter:
    """A LoRA with visible effect on the tiny pipeline (linear and conv layers alike)."""
    generator = torch.Generator().manual_seed(seed)
    lora_layers = {}
    for layer in layers if layers is not None else attention_layers(engine):
        weight = engine.live.modules[layer].weight
        out_features = weight.shape[0]
        if weight.dim() == 4:
            down = torch.randn(rank, *weight.shape[1:], generator=generator) * magnitude
            up = torch.randn(out_features, rank, 1, 1, generator=generator) * magnitude
        else:
            down = torch.randn(rank, weight.shape[1], generator=generator) * magnitude
            up = torch.randn(out_features, rank, generator=generator) * magnitude
        lora_layers[layer] = LoraLayer(down, up, alpha)
    return LoraAdapter(name, lora_layers)


@dataclass(eq=False)
class DeltaOnlyAdapter:
    """An adapter that only follows the ``Adapter`` protocol (``layers`` and ``delta``), declaring nothing."""

    name: str
    deltas: dict[str, Tensor]

    def layers(self) -> list[str]:
        return list(self.deltas)

    def delta(self, layer: str) -> Tensor:
        return self.deltas[layer]


@dataclass(eq=False)
class SharedBasisMember(AdapterBase):
    """One adapter of a shared-basis collection: delta = U @ core @ V with U, V shared."""

    has_factors = True
    has_shared_basis = True

    name: str
    bases: dict[str, tuple[Tensor, Tensor]]
    cores: dict[str, Tensor]

    def layers(self) -> list[str]:
        return list(self.cores)

    def basis(self, layer: str) -> tuple[Tensor, Tensor]:
        return self.bases[layer]

    def core(self, layer: str) -> Tensor:
        return self.cores[layer]

    def factors(self, layer: str) -> tuple[Tensor, Tensor]:
        down_basis, up_basis = self.bases[layer]
        return self.cores[layer] @ down_basis, up_basis

    def delta(self, layer: str) -> Tensor:
        down, up = self.factors(layer)
        return up @ down


def shared_collection(engine, count: int, k: int = 6, seed: int = 0) -> list[SharedBasisMember]:
    generator = torch.Generator().manual_seed(seed)
    bases = {}
    for layer in attention_layers(engine):
        out_features, in_features = engine.live.shape2d(layer)
        down_basis = torch.linalg.qr(torch.randn(in_features, k, generator=generator))[0].T.contiguous()
        up_basis = torch.linalg.qr(torch.randn(out_features, k, generator=generator))[0].contiguous()
        bases[layer] = (down_basis, up_basis)
    return [
        SharedBasisMember(f"member{i}", bases, {layer: torch.randn(k, k, generator=generator) * 0.6 for layer in bases})
        for i in range(count)
    ]
