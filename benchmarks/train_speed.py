"""Training step time and memory per family against a peft LoRA anchor measured in the same run.

The UNet is the real SD1.5 architecture (studio/configs/sd15.json "unet") with random weights;
each family is applied through the training loop's own mechanism (studio.engine.patch.Attachment).
A step is forward + backward + AdamW step at batch 4 on 64x64 latents, bf16 autocast on GPU.

    python benchmarks/train_speed.py                    # CUDA, full size
    python benchmarks/train_speed.py --quick            # CPU smoke test, shrunken UNet
    python benchmarks/train_speed.py --families lora,eigenlora --steps 30 --rank 32

Targets: coefficient-only (eigenlora) step <= 1.0x the peft LoRA step; its optimizer state >= 100x
smaller.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

if __package__ in (None, ""):  # run as a script: make the repository importable
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CONFIG = Path(__file__).resolve().parents[1] / "studio" / "configs" / "sd15.json"
TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


@dataclass
class Row:
    name: str
    params: int
    step_ms: float
    peak_mib: float
    optim_mib: float


def make_unet(quick: bool, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """SD1.5 UNet with random weights (shrunken with --quick), frozen."""
    from diffusers import UNet2DConditionModel

    config = json.loads(CONFIG.read_text())["unet"]
    if quick:
        config.update(block_out_channels=[32, 64, 64, 64], cross_attention_dim=64, attention_head_dim=8, layers_per_block=1, norm_num_groups=16)
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(config).to(device, dtype)
    unet.requires_grad_(False)
    return unet


def studio_adapter(family: str, unet: nn.Module, rank: int, k: int) -> nn.Module:
    """A studio family over the UNet's attention projections (eigenlora on synthetic orthonormal components)."""
    from studio.adapters import registry
    from studio.bases import tree_from_components

    tree = tree_from_components({"unet": unet}, "sd15")
    if family == "eigenlora":
        from studio.adapters.eigenlora import EigenLoraAdapter

        generator = torch.Generator().manual_seed(0)
        components = {}
        for layer in registry.select_layers(tree, TARGETS):
            out, inn = tree.modules[layer].weight_shape[:2]
            down = torch.linalg.qr(torch.randn(inn, k, generator=generator))[0].T.contiguous()
            up = torch.linalg.qr(torch.randn(out, k, generator=generator))[0].contiguous()
            components[layer] = (down, up)
        return EigenLoraAdapter.new("bench", components, rank)
    knobs = {"lora": {"rank": rank, "alpha": rank}, "unilora": {"d": 65536, "rank": rank},
             "superlora": {"groups": 16, "rank": rank}}[family]
    return registry.build_adapter(family, registry.make_config(family, knobs), tree)


def optimizer_mib(optimizer: torch.optim.Optimizer) -> float:
    total = sum(t.numel() * t.element_size() for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t))
    return total / 2**20


def measure(name: str, unet: nn.Module, params: list[nn.Parameter], args, device: torch.device, dtype: torch.dtype) -> Row:
    """Median step time and peak memory of forward + backward + AdamW."""
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    size = 8 if args.quick else 64
    context = 64 if args.quick else 768
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(args.batch, 4, size, size, generator=generator).to(device, dtype)
    text = torch.randn(args.batch, 77, context, generator=generator).to(device, dtype)
    timesteps = torch.randint(0, 1000, (args.batch,), generator=generator).to(device)
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for step in range(args.warmup + args.steps):
        started = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = unet(latents, timesteps, encoder_hidden_states=text).sample
        loss = torch.nn.functional.mse_loss(out.float(), latents.float())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - started)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else float("nan")
    return Row(name, sum(p.numel() for p in params), statistics.median(times) * 1000, peak, optimizer_mib(optimizer))


def run_peft(unet: nn.Module, args, device, dtype) -> Row:
    from peft import LoraConfig

    unet.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian", target_modules=list(TARGETS)))
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    return measure("peft-lora", unet, params, args, device, dtype)


def run_family(family: str, unet: nn.Module, args, device, dtype) -> Row:
    from studio.engine.patch import Attachment
    from studio.train.apply import trainable_parameters

    adapter = studio_adapter(family, unet, args.rank, args.k).to(device)
    attached = Attachment({"unet": unet}, adapter)
    try:
        return measure(family, unet, trainable_parameters(adapter), args, device, dtype)
    finally:
        attached.detach()


def table(rows: list[Row]) -> str:
    anchor = rows[0]
    lines = [f"{'family':<12} {'trainable':>11} {'step ms':>9} {'x peft':>7} {'peak MiB':>9} {'optim MiB':>10} {'peft/optim':>11}"]
    for row in rows:
        ratio = anchor.optim_mib / row.optim_mib if row.optim_mib else float("inf")
        lines.append(f"{row.name:<12} {row.params:>11,} {row.step_ms:>9.2f} {row.step_ms / anchor.step_ms:>7.2f} "
                     f"{row.peak_mib:>9.1f} {row.optim_mib:>10.3f} {ratio:>11.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CPU smoke test on a shrunken UNet")
    parser.add_argument("--families", default="lora,eigenlora,unilora,superlora")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--k", type=int, default=14, help="EigenLoRA components per layer")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 20; 2 with --quick)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5; 1 with --quick)")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.rank, args.k = 1, 4, 4
    args.steps = args.steps or (2 if args.quick else 20)
    args.warmup = args.warmup or (1 if args.quick else 5)
    device = torch.device("cpu" if args.quick or not torch.cuda.is_available() else "cuda")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    unet = make_unet(args.quick, device, dtype)
    rows = [run_family(family.strip(), unet, args, device, dtype) for family in args.families.split(",")]
    rows.insert(0, run_peft(unet, args, device, dtype))  # last: peft rewraps the modules it targets
    print(f"device {device}, batch {args.batch}, rank {args.rank}, eigenlora K {args.k}, {args.steps} timed steps")
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
