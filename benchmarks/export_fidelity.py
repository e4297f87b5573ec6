"""Exported adapters vs their originals on the embedded world: error and same-seed pixel difference.

The world zoo is compressed at several K by the compress verb (what `studio compress assets/world/loras
-o K.safetensors --k K` runs); for each K, every adapter is exported back to a plain kohya LoRA file
by the export verb (`studio export K.safetensors --adapter NAME -o NAME.safetensors`), read back as a
user's file (`studio.formats.load_adapter`) and generated with through `Engine.generate` with the
same seed, prompt and steps as the original file. Reported: mean relative reconstruction error ||dW - dW_hat|| / ||dW|| and the mean absolute
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
from studio.events import run_to_end  # noqa: E402
from studio.formats import load_adapter  # noqa: E402
from studio.verbs.compress import CompressRequest, run as compress  # noqa: E402
from studio.verbs.export import ExportRequest, run as export  # noqa: E402

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


def measure(adapters: list, sources: list[Path], ks: list[str], images: int, steps: int) -> tuple[list[FidelityRow], float]:
    """Rows per K and the anchor: mean pixel difference between base and original adapter (``sources``: their files)."""
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
        output = folder / f"k{k}.safetensors"
        outcome = run_to_end(compress(CompressRequest(paths=[str(p) for p in sources], output=str(output), k=full_k if k == "full" else int(k))))
        result = outcome.result
        diffs = []
        for adapter in adapters:
            path = export(ExportRequest(input=str(output), adapter=adapter.name, output=str(folder / f"k{k}-{adapter.name}.safetensors"))).path
            exported = load_adapter(path)
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
    collection = load_collection([world_dir() / "loras"])
    files = {info.name: Path(info.path) for info in collection.infos}
    adapters = list(collection.adapters.values())
    adapters = adapters[: args.adapters] if args.adapters else adapters
    rows, anchor = measure(adapters, [files[a.name] for a in adapters], args.ks, args.images, args.steps)
    print(f"\nworld zoo: {len(adapters)} adapters, {args.images} images each, {args.steps} DDIM steps, CPU")
    print(f"anchor: base without adapter vs original adapter, mean |pixel diff| = {anchor:.2f} / 255\n")
    print("| K | mean rel error | mean abs pixel diff (0-255) | max | diff / anchor |")
    print("|---|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row.k} | {row.rel_error:.4f} | {row.pixel_diff:.2f} | {row.pixel_diff_max:.2f} | {row.pixel_diff / anchor:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
