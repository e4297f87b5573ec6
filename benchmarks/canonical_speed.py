"""Kernel-level rows (NOT a user path): where `studio compress`'s GPU time goes per SDXL file.

Times, on one device, the pieces of the first pass and of the fit for 20 rank-32 SDXL LoRAs:
the canonical form of one file's 560 layers (`canonical_layers`), its eigh / SVD parts, and the
fit's Gram eigendecompositions (M = 640), with alternatives, each synchronised.

  python benchmarks/canonical_speed.py --device cuda
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from subspace_extract import random_lora, target_shapes  # noqa: E402

from studio.subspace.extract import batched_eigh  # noqa: E402
from studio.subspace.statistics import canonical_layers  # noqa: E402


def timed(label: str, fn, device: str, repeat: int = 3) -> float:
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    print(f"{label:<70} {best * 1e3:9.1f} ms", flush=True)
    return best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--count", type=int, default=20)
    parser.add_argument("--streams", default="", help="only the fit's sweep: comma-separated stream counts for batched_eigh (CUDA), e.g. 1,2,4,8,16")
    args = parser.parse_args()
    device = args.device
    if args.streams:  # only the fit's stream sweep
        return streams_sweep(args, args.count * 32)
    adapter = random_lora("x", target_shapes("sdxl"), 32, 0, seed=0)
    layers = list(adapter.lora_layers.values())
    print(f"{len(layers)} layers, {sum(l.down.nbytes + l.up.nbytes for l in layers) / 1e6:.0f} MB, dtype {layers[0].down.dtype}")
    timed("canonical_layers (one SDXL file, host factors -> device)", lambda: canonical_layers(layers, device), device)
    if device == "cuda":
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            canonical_layers(layers, device)
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=15))
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    for dtype in (torch.float64, torch.float32):
        g = torch.randn(280, 32, 32, dtype=dtype, device=device)
        g = g @ g.mT
        timed(f"eigh (280, 32, 32) {dtype}", lambda: torch.linalg.eigh(g), device)
        timed(f"svd (280, 32, 32) {dtype}", lambda: torch.linalg.svd(g), device)
        timed(f"eigh (280, 32, 32) {dtype} on cpu (copy both ways)", lambda: [t.to(device) for t in torch.linalg.eigh(g.cpu())], device)
        timed(f"svd (280, 32, 32) {dtype} on cpu (copy both ways)", lambda: [t.to(device) for t in torch.linalg.svd(g.cpu())], device)
    m = args.count * 32
    for count in (64, 280):
        rows = torch.randn(count, m, 1280, dtype=torch.float64, device=device)
        grams = rows @ rows.mT
        timed(f"fit: batched_eigh ({count}, {m}, {m}) float64 (4 streams)", lambda: batched_eigh(grams), device)
        timed(f"fit: eigh ({count}, {m}, {m}) float64 (one call)", lambda: torch.linalg.eigh(grams), device, 1)
        timed(f"fit: eigvalsh ({count}, {m}, {m}) float64", lambda: torch.linalg.eigvalsh(grams), device, 1)
        g32 = grams.float()
        timed(f"fit: eigh ({count}, {m}, {m}) float32 (4 streams)", lambda: batched_eigh(g32), device, 1)
        timed(f"fit: eigh ({count}, {m}, {m}) float64 on cpu", lambda: torch.linalg.eigh(grams.cpu()), device, 1)


def streams_sweep(args, m: int) -> None:
    """`batched_eigh` of the 20-file SDXL fit's batch at several stream counts, and MAGMA's eigh."""
    import importlib

    extract = importlib.import_module("studio.subspace.extract")  # the module (the package exports a function of that name)
    rows = torch.randn(280, m, 1280, dtype=torch.float64, device="cuda")
    grams = rows @ rows.mT
    reference = torch.linalg.eigvalsh(grams[:4])
    for streams in [int(s) for s in args.streams.split(",")]:
        extract.CUDA_EIGH_STREAMS = streams
        values, _ = extract.batched_eigh(grams)
        assert torch.allclose(values[:4], reference, rtol=1e-9, atol=1e-9 * float(reference.abs().max()))
        timed(f"fit: batched_eigh (280, {m}, {m}) float64, {streams} streams", lambda: extract.batched_eigh(grams), "cuda", 2)
    extract.CUDA_EIGH_STREAMS = 4
    torch.backends.cuda.preferred_linalg_library("magma")
    timed(f"fit: eigh (280, {m}, {m}) float64, MAGMA, one call", lambda: torch.linalg.eigh(grams), "cuda", 1)
    torch.backends.cuda.preferred_linalg_library("default")


if __name__ == "__main__":
    main()
