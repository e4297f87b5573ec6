"""Serving many users: concurrent clients with different adapters, gathered into per-image batches.

C clients (threads), each with its own adapter, each sending R requests of one image one after
another (it waits for its images before sending the next), through ``Batcher.submit(request)``
(what the app / HTTP API will call), against the same C x R requests sent one at a time through
``Engine.generate(request)`` on the same engine. Reported: wall time, images per second, the
throughput ratio (target >= 3x with 8 clients and 8 adapters), the median latency a client sees,
the batch sizes the batcher ran, and how far the batched images are from the sequential ones
(max |pixel difference| in [0, 1], and the share of 8-bit pixel values that are identical).

    GPU:  python benchmarks/engine_serve.py --device cuda --arch sd15 sdxl
    CPU (the embedded world):  python benchmarks/engine_serve.py --arch world
    CPU smoke test:  python benchmarks/engine_serve.py --arch world --quick
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine_models import build_pipeline, device_name, random_loras  # noqa: E402

from studio.bases import world_dir  # noqa: E402
from studio.engine import Batcher, BatcherConfig, Engine, EngineConfig, GenerateRequest, NonFiniteUpdateError  # noqa: E402

PROMPTS = ["a red circle on a white background", "a blue star", "a small yellow square", "a green triangle on black",
           "a large white circle", "a black square on a blue background", "a yellow star", "a red triangle"]


def adapters_for(engine: Engine, arch: str, count: int, rank: int) -> list[str]:
    """``count`` adapter names registered in the engine: zoo files on the world, random LoRAs otherwise."""
    if arch == "world":
        files = sorted((world_dir() / "loras").glob("*.safetensors"))[:count]
        return [engine.register(path.stem, engine.mix(str(path)).terms[0].adapter) for path in files]
    return [engine.register(lora.name, lora) for lora in random_loras(engine.pipe.unet, count, rank)]


def client_requests(names: list[str], per_client: int, steps: int, size: int | None) -> list[list[GenerateRequest]]:
    return [[GenerateRequest(prompt=PROMPTS[(c + j) % len(PROMPTS)], adapters=[name], seed=1000 * c + j, steps=steps,
                             width=size, height=size) for j in range(per_client)] for c, name in enumerate(names)]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def one_at_a_time(engine: Engine, plan: list[list[GenerateRequest]], device: torch.device) -> tuple[float, list[float], dict]:
    """Every request through Engine.generate, in the order the clients would interleave them."""
    order = [(c, j) for j in range(len(plan[0])) for c in range(len(plan))]
    images, latencies = {}, []
    sync(device)
    began = time.perf_counter()
    for c, j in order:
        started = time.perf_counter()
        images[(c, j)] = engine.generate(plan[c][j])[0]
        sync(device)
        latencies.append(time.perf_counter() - started)
    return time.perf_counter() - began, latencies, images


def concurrent(engine: Engine, plan: list[list[GenerateRequest]], config: BatcherConfig, device: torch.device) -> tuple[float, list[float], dict, list[int]]:
    """Every client in its own thread, each waiting for its images before its next request."""
    images, latencies, errors, lock = {}, [], [], threading.Lock()
    batcher = Batcher(engine, config)

    def client(c: int) -> None:
        try:
            for j, request in enumerate(plan[c]):
                started = time.perf_counter()
                result = batcher.submit(request).result()
                with lock:
                    images[(c, j)] = result[0]
                    latencies.append(time.perf_counter() - started)
        except Exception as error:  # noqa: BLE001 - re-raised in the main thread below
            errors.append(error)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(len(plan))]
    sync(device)
    began = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    sync(device)
    wall = time.perf_counter() - began
    batcher.close()
    if errors:
        raise errors[0]
    return wall, latencies, images, batcher.batch_sizes


def compare(a: dict, b: dict) -> tuple[float, float]:
    diffs = [float(np.abs(a[key].pixels - b[key].pixels).max()) for key in a]
    same = [float((np.asarray(a[key].image) == np.asarray(b[key].image)).mean()) for key in a]
    return max(diffs), sum(same) / len(same)


def measure(arch: str, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> str:
    pipe = build_pipeline(arch, device, dtype, quick=args.quick and arch != "world")
    engine = Engine(pipe, arch, EngineConfig(device=str(device), dtype=str(dtype).removeprefix("torch.")))
    names = adapters_for(engine, arch, args.clients, args.rank)
    plan = client_requests(names, args.requests, args.steps, args.size or None)
    config = BatcherConfig(window_s=args.window, max_images=args.max_images)
    warm = [[plan[c][0]] for c in range(len(plan))]  # prepares every adapter, warms both paths
    one_at_a_time(engine, warm, device)
    concurrent(engine, warm, config, device)
    sequential, seq_latency, seq_images = one_at_a_time(engine, plan, device)
    batched, bat_latency, bat_images, sizes = concurrent(engine, plan, config, device)
    total = len(seq_images)
    max_diff, same = compare(bat_images, seq_images)
    width, height = engine.size_of(plan[0][0])
    lines = [
        f"\n## {arch}: {args.clients} clients x {args.requests} requests, 1 image {width}x{height}, {args.steps} steps, "
        f"{len(names)} adapters (window {args.window * 1000:.0f} ms, max {args.max_images} images)", "",
        "| what (public API call timed) | wall s | images/s | x anchor | median latency s | target |", "|---|---:|---:|---:|---:|---|",
        f"| one at a time: Engine.generate(request) | {sequential:.2f} | {total / sequential:.3f} | 1.000 | {statistics.median(seq_latency):.3f} | anchor |",
        f"| {args.clients} concurrent clients: Batcher.submit(request).result() | {batched:.2f} | {total / batched:.3f} | "
        f"{sequential / batched:.3f} | {statistics.median(bat_latency):.3f} | >= 3x throughput |",
        "", f"batch sizes run: {sizes}; batched vs sequential images: max |pixel difference| {max_diff:.2e}, "
        f"{same * 100:.2f}% of 8-bit pixel values identical",
    ]
    del engine, pipe
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", nargs="+", default=["sd15", "sdxl"], choices=["world", "sd15", "sdxl"])
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None, choices=["float16", "bfloat16", "float32"], help="default: float16 on cuda, float32 on cpu")
    parser.add_argument("--quick", action="store_true", help="smoke test: shrunken models, 2 steps, 4 clients")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=2, help="requests per client")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=0, help="image side (0: the base's native size)")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--window", type=float, default=0.025, help="batcher window in seconds")
    parser.add_argument("--max-images", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for torch on the CPU (1: steady on a shared machine)")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.clients, args.requests, args.rank = min(args.steps, 2), min(args.clients, 4), 1, 4
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float16 if device.type == "cuda" else torch.float32)
    print(f"# engine_serve: {device_name(device)}, {dtype}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads"
          f"{' (quick)' if args.quick else ''}")
    for arch in args.arch:
        try:
            print(measure(arch, args, device, dtype), flush=True)
        except NonFiniteUpdateError as error:  # random weights can overflow in fp16: say so, go on
            print(f"\n## {arch}: not measured: {error} (try --dtype bfloat16)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
