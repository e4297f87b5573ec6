"""Tiny synthetic LoRA collections with a known shared subspace (no model needed)."""

from __future__ import annotations

import torch

from studio.adapters.lora import LoraAdapter, LoraLayer

SHAPES = {  # layer: (out, in)
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": (48, 32),
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": (40, 64),
    "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0": (64, 56),
}


def orthonormal(rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(rows, cols, generator=generator))[0]


def shared_bases(true_k: int, seed: int = 0, shapes=SHAPES) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per layer: down basis (K, in) and up basis (out, K), orthonormal."""
    generator = torch.Generator().manual_seed(seed)
    return {name: (orthonormal(n_in, true_k, generator).T, orthonormal(n_out, true_k, generator)) for name, (n_out, n_in) in shapes.items()}


def in_span_adapter(name: str, bases: dict, rank: int, seed: int, alpha: float | None = None, layers: list[str] | None = None) -> LoraAdapter:
    """An adapter whose down rows and up columns lie in the given bases."""
    generator = torch.Generator().manual_seed(seed)
    lora_layers = {}
    for layer, (down_basis, up_basis) in bases.items():
        if layers is not None and layer not in layers:
            continue
        k = down_basis.shape[0]
        down = torch.randn(rank, k, generator=generator) @ down_basis
        up = up_basis @ torch.randn(k, rank, generator=generator)
        lora_layers[layer] = LoraLayer(down, up, float(alpha if alpha is not None else rank))
    return LoraAdapter(name, lora_layers, metadata={"ss_network_dim": str(rank), "origin": name})


def shared_collection(n: int, rank: int = 4, true_k: int = 6, seed: int = 0) -> list[LoraAdapter]:
    bases = shared_bases(true_k, seed)
    return [in_span_adapter(f"lora_{i:02d}", bases, rank, seed * 1000 + i + 1, alpha=rank / 2) for i in range(n)]


def random_adapter(name: str, rank: int = 4, seed: int = 99, shapes=SHAPES) -> LoraAdapter:
    generator = torch.Generator().manual_seed(seed)
    return LoraAdapter(name, {l: LoraLayer(torch.randn(rank, i, generator=generator), torch.randn(o, rank, generator=generator), float(rank)) for l, (o, i) in shapes.items()})


def relative_delta_error(a, b, layer: str) -> float:
    reference = a.delta(layer)
    return float((b.delta(layer).float() - reference).norm() / reference.norm())


_FOLDER: list = []


def compressed(adapters: list[LoraAdapter], **options):
    """`compress_sources` of in-memory adapters (the streaming compress every front end runs),
    written to a file in a temporary folder removed at exit; returns the `CompressResult`."""
    import atexit
    import shutil
    import tempfile
    from pathlib import Path

    from studio.subspace import compress_sources, held_sources

    if not _FOLDER:
        _FOLDER.append(Path(tempfile.mkdtemp(prefix="studio-subspace-tests-")))
        atexit.register(shutil.rmtree, _FOLDER[0], True)
    output = _FOLDER[0] / f"c{len(list(_FOLDER[0].iterdir()))}.safetensors"
    return compress_sources(held_sources(adapters), output, **options)
