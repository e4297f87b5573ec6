"""Small data sets and configs for training tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from studio.train.config import TrainConfig

COLOURS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 180, 60)}


def shape_image(colour: str, shape: str, size: int = 32, seed: int = 0) -> Image.Image:
    """A coloured circle or square on a white background, jittered by seed."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    cx, cy = size / 2 + rng.uniform(-3, 3), size / 2 + rng.uniform(-3, 3)
    radius = size * rng.uniform(0.25, 0.35)
    if shape == "circle":
        mask = (xx - cx) ** 2 + (yy - cy) ** 2 < radius**2
    else:
        mask = (abs(xx - cx) < radius) & (abs(yy - cy) < radius)
    array = np.full((size, size, 3), 255, np.uint8)
    array[mask] = COLOURS[colour]
    return Image.fromarray(array)


def style_folder(root: Path, count: int = 8, colour: str = "red") -> Path:
    """A folder of ``count`` captioned images in one 'style' (one colour, two shapes)."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        shape = ("circle", "square")[i % 2]
        shape_image(colour, shape, seed=i).save(root / f"img{i:02d}.png")
        (root / f"img{i:02d}.txt").write_text(f"a {colour} {shape}")
    return root


def tiny_config(base: Path, data: Path, out: Path, family: str = "lora", **overrides) -> TrainConfig:
    """A fast CPU config on the tiny pipeline."""
    knobs = overrides.pop("adapter", {})
    values = dict(base=str(base), data=str(data), output_dir=str(out), family=family, adapter=knobs,
                  steps=30, batch_size=4, learning_rate=3e-3, seed=0, tensorboard=False, export_format="none",
                  validation_split=0.25, loss_weighting="none", lr_schedule="constant")
    values.update(overrides)
    return TrainConfig(**values)


FAMILIES = ("lora", "superlora", "superlora_tucker", "unilora", "eigenlora")


def family_of(case: str) -> str:
    """Test case names map to families ('superlora_tucker' is a superlora)."""
    return case.split("_")[0]


def tiny_collection(pipeline_dir: Path, path: Path, count: int = 4, rank: int = 4) -> Path:
    """A compressed collection of random LoRAs on the tiny pipeline's attention layers (its denoiser's)."""
    import torch

    from studio.adapters.lora import LoraAdapter, LoraLayer
    from studio.adapters.registry import select_layers
    from studio.bases import base_for, module_tree
    from studio.subspace import compress_sources, held_sources

    tree = module_tree(str(pipeline_dir))
    layers = select_layers(tree, components=(base_for(tree).denoiser,))
    generator = torch.Generator().manual_seed(3)
    adapters = []
    for n in range(count):
        lora_layers = {}
        for layer in layers:
            out, inn = tree.modules[layer].weight_shape[:2]
            lora_layers[layer] = LoraLayer(torch.randn(rank, inn, generator=generator), torch.randn(out, rank, generator=generator), float(rank))
        adapters.append(LoraAdapter(f"zoo{n}", lora_layers))
    compress_sources(held_sources(adapters), path, k=8)
    return path
