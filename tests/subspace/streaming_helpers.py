"""Sources and a worker shared by the streaming tests (importable by spawned processes)."""

from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from studio.adapters.lora import LoraAdapter, LoraLayer


@dataclass
class GeneratedSource:
    """An adapter generated on demand from its seed: nothing is held between loads."""

    name: str
    seed: int
    shapes: dict
    rank: int = 8
    true_k: int = 12

    def load(self) -> LoraAdapter:
        bases = torch.Generator().manual_seed(0)
        generator = torch.Generator().manual_seed(self.seed)
        layers = {}
        for layer, (n_out, n_in) in self.shapes.items():
            down_basis = torch.randn(self.true_k, n_in, generator=bases)
            up_basis = torch.randn(n_out, self.true_k, generator=bases)
            noise = 0.01 * torch.randn(self.rank, n_in, generator=generator)
            layers[layer] = LoraLayer(torch.randn(self.rank, self.true_k, generator=generator) @ down_basis + noise, up_basis @ torch.randn(self.true_k, self.rank, generator=generator), float(self.rank))
        return LoraAdapter(self.name, layers, {"seed": str(self.seed)})

    def sha256(self) -> str:
        return hashlib.sha256(str(self.seed).encode()).hexdigest()

    def nbytes(self) -> int:
        return sum(4 * self.rank * (i + o) for o, i in self.shapes.values())


def save_plain(adapter: LoraAdapter, path: Path) -> Path:
    """A minimal test file layout: ``{layer}.down``, ``{layer}.up``, ``{layer}.alpha``."""
    tensors = {}
    for name, layer in adapter.lora_layers.items():
        tensors[f"{name}.down"], tensors[f"{name}.up"], tensors[f"{name}.alpha"] = layer.down.contiguous(), layer.up.contiguous(), torch.tensor(layer.alpha)
    save_file(tensors, str(path), metadata=adapter.metadata)
    return path


def load_plain(path: Path) -> LoraAdapter:
    tensors = load_file(str(path))
    layers = {key[: -len(".down")]: None for key in tensors if key.endswith(".down")}
    return LoraAdapter(Path(path).stem, {n: LoraLayer(tensors[f"{n}.down"], tensors[f"{n}.up"], float(tensors[f"{n}.alpha"])) for n in layers})


def sources(count: int, shapes: dict, rank: int = 8) -> list[GeneratedSource]:
    return [GeneratedSource(f"gen_{i:04d}", 100 + i, shapes, rank) for i in range(count)]


def distributed_worker(rank: int, world: int, port: int, output: str, count: int, shapes: dict) -> None:
    """One rank of a gloo group compressing the generated sources (torch.multiprocessing.spawn)."""
    import torch.distributed as dist

    from studio.subspace import compress_sources

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        result = compress_sources(sources(count, shapes), output, k=10)
        assert len(result.adapters) == count
    finally:
        dist.destroy_process_group()


def spawn_two(output: str, count: int, port: int) -> None:
    """Run `distributed_worker` on 2 gloo ranks (called in a fresh interpreter: fast spawn)."""
    import torch.multiprocessing as mp

    from tests.subspace.synthetic import SHAPES

    mp.spawn(distributed_worker, args=(2, port, output, count, dict(SHAPES)), nprocs=2, join=True)


HELD_BYTES = 4 << 20


def peak_memory_main() -> None:
    """``python -m tests.subspace.streaming_helpers COUNT OUTPUT``: print ru_maxrss (KiB) after compressing."""
    import resource

    from studio.subspace import compress_sources

    count, output = int(sys.argv[1]), sys.argv[2]
    shapes = {f"unet.layer{i}.to_q": (768, 768) for i in range(4)}
    torch.set_num_threads(1)
    compress_sources(sources(count, shapes, rank=32), output, k=8, held_bytes=HELD_BYTES)  # factors beyond this spill to disk
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


if __name__ == "__main__" and os.environ.get("STUDIO_PEAK_TEST") == "1":
    peak_memory_main()
