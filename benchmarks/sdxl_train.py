"""SDXL LoRA training speed and memory through `studio.train`, against a peft LoRA anchor.

The real SDXL architecture (UNet and both text encoders from studio/configs/sdxl.json, the SD
VAE; random bf16 weights built on the GPU; ``benchmarks/engine_models.py``; the world's word-level
tokenizer stands in for CLIP's, token ids only matter for speed) trains a rank-r LoRA (to_q /
to_k / to_v / to_out.0) through ``studio.train.train(config)``, the real loop on a folder of
random images (``benchmarks/flux_train.py`` holds the shared measuring code): batch 1 and 4 at
1024 px with SDXL's added time ids, bf16 mixed precision; plus one run that also trains both
text encoders (``components = [unet, text_encoder, text_encoder_2]``: the captions are encoded
every step through the trained layers). The anchor is a minimal peft LoRA loop on the same UNet
at the same batch (measured in the same run).

    GPU:  python benchmarks/sdxl_train.py --device cuda
    CPU smoke test (shrunken UNet, 64 px): python benchmarks/sdxl_train.py --quick
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine_models import build_pipeline, device_name  # noqa: E402
from flux_train import LORA_TARGETS, Run, common_args, quick_args, run_all  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common_args(parser, "1,4")
    args = quick_args(parser.parse_args(argv))
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    began = time.perf_counter()
    pipe = build_pipeline("sdxl", device, dtype, quick=args.quick)
    unet = sum(p.numel() for p in pipe.unet.parameters())
    print(f"# sdxl_train: {device_name(device)}, {dtype}, torch {torch.__version__}{' (quick)' if args.quick else ''}")
    encoders = "shrunken" if args.quick else "real"
    print(f"# SDXL UNet {unet:,} parameters, {encoders} text encoders (built in {time.perf_counter() - began:.1f} s); {args.size} px, "
          f"LoRA rank {args.rank} on {'/'.join(LORA_TARGETS)}, {args.steps} steps per run (median after {args.warmup}); "
          "peak memory includes the weights")
    knobs = {"rank": args.rank, "alpha": args.rank, "components": ["unet", "text_encoder", "text_encoder_2"]}
    extra = [Run(1, family="lora", knobs=knobs, label="lora on unet+text_encoder+text_encoder_2")]
    print(run_all(pipe, "sdxl", args, device, text_tokens=77, extra=extra), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
