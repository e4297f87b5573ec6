"""Exported adapters vs their originals on the embedded world: error and same-seed pixel difference.

The world zoo is compressed at several K; for each K, adapters are exported back to plain LoRA
files (in memory) and images generated with the same seed, prompt and steps as with the original
file. Reported: mean relative reconstruction error ||dW - dW_hat|| / ||dW|| and the mean absolute
pixel difference (0-255) between the two images, against the base without any adapter as anchor
(how far the original adapter moves the image at all).

    python benchmarks/export_fidelity.py                   # CPU, the whole zoo, K = 2 4 8 14 24 full
    python benchmarks/export_fidelity.py --adapters 6 --ks 4 full --images 2
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from studio.bases import world_dir  # noqa: E402
from studio.collection import load_collection, trigger_words  # noqa: E402
from studio.engine import Engine, GenerateRequest  # noqa: E402
from studio.subspace import compress_sources, held_sources  # noqa: E402

PROMPTS = ("a red circle on a white background", "a small blue star on a black background, top left")


@dataclass
class FidelityRow:
    k: str
    rel_error: float
    pixel_diff: float
    pixel_diff_max: float


def _pixels(engine: Engine, adapter, prompt: str, seed: int, steps: int) -> np.ndarray:
    request = GenerateRequest(prompt=prompt, seed=seed, steps=steps, adapters=[adapter] if adapter is not None else [])
    return np.asarray(engine.generate(request)[0].pixels, dtype=np.float64) * 255.0


def prompt_for(adapter, prompt: str) -> str:
    words = trigger_words(adapter.metadata)
    return f"{words[0]}, {prompt}" if words else prompt


def measure(adapters: list, ks: list[str], images: int, steps: int) -> tuple[list[FidelityRow], float]:
    """Rows per K and the anchor: mean pixel difference between base and original adapter."""
    engine = Engine.load("world")
    originals = {}
    anchor = []
    for adapter in adapters:
        for i in range(images):
            prompt = prompt_for(adapter, PROMPTS[i % len(PROMPTS)])
            originals[(adapter.name, i)] = _pixels(engine, adapter, prompt, seed=i, steps=steps)
            anchor.append(np.abs(originals[(adapter.name, i)] - _pixels(engine, None, prompt, seed=i, steps=steps)).mean())
    rows = []
    full_k = max(l.rank for a in adapters for l in a.lora_layers.values()) * len(adapters)
    folder = Path(tempfile.mkdtemp(prefix="export-fidelity-"))
    for k in ks:
        result = compress_sources(held_sources(adapters), folder / f"k{k}.safetensors", k=full_k if k == "full" else int(k))
        diffs = []
        for adapter in adapters:
            exported = result.collection.export(adapter.name)
            for i in range(images):
                prompt = prompt_for(adapter, PROMPTS[i % len(PROMPTS)])
                diffs.append(np.abs(_pixels(engine, exported, prompt, seed=i, steps=steps) - originals[(adapter.name, i)]).mean())
        errors = [report.rel_error for report in result.adapters]
        rows.append(FidelityRow(k, float(np.mean(errors)), float(np.mean(diffs)), float(np.max(diffs))))
    return rows, float(np.mean(anchor))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapters", type=int, default=0, help="first N zoo adapters (0: all)")
    parser.add_argument("--ks", nargs="+", default=["2", "4", "8", "14", "24", "full"])
    parser.add_argument("--images", type=int, default=2, help="images per adapter")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    adapters = list(load_collection([world_dir() / "loras"]).adapters.values())
    adapters = adapters[: args.adapters] if args.adapters else adapters
    rows, anchor = measure(adapters, args.ks, args.images, args.steps)
    print(f"\nworld zoo: {len(adapters)} adapters, {args.images} images each, {args.steps} DDIM steps, CPU")
    print(f"anchor: base without adapter vs original adapter, mean |pixel diff| = {anchor:.2f} / 255\n")
    print("| K | mean rel error | mean abs pixel diff (0-255) | max | diff / anchor |")
    print("|---|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row.k} | {row.rel_error:.4f} | {row.pixel_diff:.2f} | {row.pixel_diff_max:.2f} | {row.pixel_diff / anchor:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
