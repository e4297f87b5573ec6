"""`studio compress PATH... -o OUT.safetensors (--k K | --energy E) [--augment P] [--base BASE] [--json]`.

Streams the files (memory bounded by one adapter plus per-layer statistics). Started by
`torchrun` / `accelerate launch`, the files are sharded across the ranks and the statistics
all-reduced; rank 0 writes the file and prints.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from studio.commands._output import drive, print_json, print_table


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("compress", help="compress LoRA files into shared EigenLoRAx components + per-adapter loadings")
    parser.add_argument("paths", nargs="+", help="LoRA files or folders of *.safetensors")
    parser.add_argument("-o", "--output", required=True, help="compressed collection .safetensors to write")
    size = parser.add_mutually_exclusive_group(required=True)
    size.add_argument("--k", type=int, help="components per layer")
    size.add_argument("--energy", type=float, help="smallest K per layer explaining this fraction of the energy (0-1]")
    parser.add_argument("--augment", type=int, default=0, help="P extra random components orthogonal to the principal ones")
    parser.add_argument("--base", default="", help="base model id recorded in the file (default: the adapters' detected base)")
    parser.add_argument("--seed", type=int, default=0, help="seed of completion / augmentation components")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (math runs there; cuda:LOCAL_RANK under torchrun)")
    parser.add_argument("--stats-dtype", choices=["float64", "float32"], default="float64",
                        help="per-layer statistics precision (float32 halves their memory: SDXL 7.5 GiB instead of 15)")
    parser.add_argument("--json", action="store_true", help="print a JSON object instead of a table")
    return parser


def _start_distributed(device: str) -> tuple[str, bool]:
    """Join the process group torchrun / accelerate describe in the environment, if any."""
    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return device, False
    if device.startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        dist.init_process_group("nccl")
        return f"cuda:{local}", True
    dist.init_process_group("gloo")
    return device, True


def _print_result(result, as_json: bool) -> None:
    if as_json:
        print_json(result.as_json())
        return
    rows = [[a.name, f"{a.rel_error:.3e}", f"{a.bytes_in:,}", f"{a.bytes_out:,}"] for a in result.adapters]
    print_table(rows, ["adapter", "rel error (all layers)", "bytes in", "loadings bytes"])
    ks = list(result.k.values())
    ratio = result.bytes_out / result.bytes_in if result.bytes_in else float("nan")
    print(f"\n{len(result.adapters)} adapters, {len(ks)} layers, K per layer {min(ks)}..{max(ks)} (mean {sum(ks) / len(ks):.1f})")
    print(f"size {result.bytes_in:,} -> {result.bytes_out:,} bytes ({ratio:.3f} of the input); wrote {result.path}")


def run(args) -> int:
    import torch
    import torch.distributed as dist

    from studio.subspace import compress_events, file_sources

    device, started = _start_distributed(args.device)
    try:
        first_rank = not dist.is_initialized() or dist.get_rank() == 0
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            events = compress_events(
                file_sources(args.paths), args.output, k=args.k, energy=args.energy, augment=args.augment, base_id=args.base,
                seed=args.seed, device=device, statistics_dtype=getattr(torch, args.stats_dtype),
            )
            result = drive(events, quiet=args.json or not first_rank)  # bars on stderr, one per pass
        if first_rank:
            for warning in caught:
                print(f"warning: {warning.message}", file=sys.stderr)
            _print_result(result, args.json)
    finally:
        if started:
            import torch.distributed as dist

            dist.destroy_process_group()
    return 0
