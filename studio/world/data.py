"""The world's data set, rendered once: base scenes plus every style's train and held-out images.

Everything is one uint8 image tensor with a style index per image (-1 = plain world) and the
token ids of each caption, saved as one safetensors file, so training keeps it on the device and
never renders or tokenizes inside the loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor

from studio.fileio import save_safetensors
from studio.world.scene import captions_with_dropout, render, sample_scenes
from studio.world.styles import Style

BASE = -1


@dataclass
class WorldData:
    """Images (N, 3, H, W) uint8, style index (N,), caption token ids (N, L), held-out flag (N,)."""

    images: Tensor
    style: Tensor
    ids: Tensor
    heldout: Tensor

    def select(self, style: int, heldout: bool = False) -> Tensor:
        """Indices of one style's (train or held-out) images."""
        return torch.nonzero((self.style == style) & (self.heldout == heldout)).flatten()

    def to(self, device: str | torch.device) -> "WorldData":
        return WorldData(self.images.to(device), self.style.to(device), self.ids.to(device), self.heldout.to(device))


def style_scenes_seed(seed: int, index: int, heldout: bool) -> int:
    """Seed of a style's scenes: distinct per style and split, stable across runs."""
    return seed * 1000 + 2 * index + 1 + (1 if heldout else 0) + 17


def style_split(style: Style, index: int, n: int, seed: int, heldout: bool, size: int) -> tuple[Tensor, list[str]]:
    """One style's images and captions (trigger first): plain scenes rendered, then styled."""
    scene_seed = style_scenes_seed(seed, index, heldout)
    scenes = sample_scenes(n, scene_seed)
    captions = [style.caption(c) for c in captions_with_dropout(scenes, scene_seed + 7)]
    return style.apply(render(scenes, size), seed=scene_seed), captions


def render_world(styles: list[Style], tokenizer, base_images: int, style_images: int, val_images: int, seed: int, size: int = 64) -> WorldData:
    """Render the plain world and each style's splits, and tokenize every caption."""
    scenes = sample_scenes(base_images, seed)
    parts = [(render(scenes, size), captions_with_dropout(scenes, seed + 1), BASE, False)]
    for i, style in enumerate(styles):
        for heldout, n in ((False, style_images), (True, val_images)):
            images, captions = style_split(style, i, n, seed, heldout, size)
            parts.append((images, captions, i, heldout))
    images = torch.cat([p[0] for p in parts])
    captions = [c for p in parts for c in p[1]]
    style = torch.cat([torch.full((len(p[1]),), p[2], dtype=torch.int32) for p in parts])
    heldout = torch.cat([torch.full((len(p[1]),), p[3], dtype=torch.bool) for p in parts])
    return WorldData(images, style, tokenize(tokenizer, captions), heldout)


def tokenize(tokenizer, captions: list[str]) -> Tensor:
    """Token ids (N, max_length), padded and truncated the way the pipeline does it."""
    out = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt")
    return out["input_ids"].to(torch.int32)


def save_world(data: WorldData, path: str | Path) -> Path:
    tensors = {"images": data.images, "style": data.style, "ids": data.ids, "heldout": data.heldout.to(torch.uint8)}
    return save_safetensors(tensors, path)


def load_world(path: str | Path) -> WorldData:
    t = load_file(str(path))
    return WorldData(t["images"], t["style"], t["ids"], t["heldout"].bool())
