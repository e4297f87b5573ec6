"""Training step time and memory per family through ``studio.train.train(config)``, against a peft LoRA anchor.

What is timed is what `studio train` and the app's Train tab run: the training loop on a folder of
random images (VAE-encoded and text-encoded once, bf16 mixed precision on CUDA, AdamW, validation
at the first and last step), one run per family on the real SD1.5 architecture (UNet and text
encoder from studio/configs/sd15.json, random weights; ``benchmarks/engine_models.py``) at 512 px
(64 x 64 latents), batch 4, rank 32 on to_q / to_k / to_v / to_out.0. EigenLoRAx trains its
coefficients over a collection made by the compress verb (``studio.verbs.compress``, what `studio
compress` runs) of 20 random rank-32 LoRA files written to disk. Step time is the median interval
between the loop's Progress events after the warm-up steps (the last step, which validates, left
out); optimizer MiB is AdamW's state after the first step. The anchor is a minimal peft LoRA loop on
the same UNet at the same batch and rank, measured in the same run (``benchmarks/flux_train.py``
holds the shared measuring code).

    GPU:  python benchmarks/train_speed.py --device cuda
    CPU smoke test (shrunken UNet, 64 px): python benchmarks/train_speed.py --quick

Targets (training issue): a coefficient-only (eigenlora) step <= 1.0x a LoRA step; its optimizer
state >= 100x smaller than LoRA's.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine_models import build_pipeline, device_name, random_loras, target_layers  # noqa: E402
from flux_train import LORA_TARGETS, Run, common_args, quick_args, run_all  # noqa: E402

COLLECTION_FILES = 20


def make_collection(pipe, folder: Path, args, device: torch.device) -> Path:
    """``COLLECTION_FILES`` random rank-r LoRA files on the UNet's to_q/k/v/out layers, compressed at K by the
    compress verb: the collection the eigenlora runs train over (placed on `sd15`; with --quick on the shrunken
    pipeline saved to a folder, a local base as users give one)."""
    from studio.events import run_to_end
    from studio.formats import save_adapter
    from studio.verbs.compress import CompressRequest, run as compress

    layers = [name for name in target_layers(pipe.unet) if name.endswith(tuple(LORA_TARGETS))]
    files = folder / "loras"
    files.mkdir(parents=True)
    base = "sd15"
    if args.quick:
        base = str(folder / "base")
        pipe.save_pretrained(base)
    for adapter in random_loras(pipe.unet, COLLECTION_FILES, args.rank, targets=layers):
        save_adapter(adapter, files / f"{adapter.name}.safetensors", format="kohya")
    output = folder / "collection.safetensors"
    run_to_end(compress(CompressRequest(paths=[str(files)], output=str(output), k=args.k, base=base, device=device.type)))
    return output


def family_runs(args, collection: Path) -> list[Run]:
    r = args.rank
    table = {
        "lora": Run(args.batch, family="lora", knobs={"rank": r, "alpha": r}, label=f"lora r={r}"),
        "eigenlora": Run(args.batch, family="eigenlora", knobs={"collection": str(collection), "k": args.k, "rank": r},
                         label=f"eigenlora K={args.k} (coefficients only)"),
        "unilora": Run(args.batch, family="unilora", knobs={"d": args.unilora_d, "rank": r, "alpha": r}, label=f"unilora d={args.unilora_d:,}"),
        "superlora": Run(args.batch, family="superlora", knobs={"groups": 16, "rank": r, "alpha": r}, label="superlora G=16"),
    }
    return [table[name.strip()] for name in args.families.split(",")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common_args(parser, "")
    parser.add_argument("--families", default="lora,eigenlora,unilora,superlora")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--k", type=int, default=14, help="EigenLoRAx components per layer")
    parser.add_argument("--unilora-d", type=int, default=65536)
    parser.set_defaults(size=512, rank=32, steps=12, warmup=4)
    args = quick_args(parser.parse_args(argv))
    if args.quick:
        args.batch, args.k, args.unilora_d = 1, 4, 256
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    began = time.perf_counter()
    pipe = build_pipeline("sd15", device, dtype, quick=args.quick)
    unet = sum(p.numel() for p in pipe.unet.parameters())
    print(f"# train_speed: {device_name(device)}, {dtype}, torch {torch.__version__}{' (quick)' if args.quick else ''}")
    print(f"# SD1.5 UNet {unet:,} parameters (built in {time.perf_counter() - began:.1f} s); {args.size} px, batch {args.batch}, "
          f"rank {args.rank} on {'/'.join(LORA_TARGETS)}, {args.steps} steps per run (median after {args.warmup}); "
          "peak memory includes the weights")
    with tempfile.TemporaryDirectory() as folder:
        collection = make_collection(pipe, Path(folder), args, device)
        print(run_all(pipe, "sd15", args, device, text_tokens=77, extra=family_runs(args, collection)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
