"""Step time of the world's zoo training: several LoRAs at once (per-sample) vs the pre-merge hook, vs one LoRA.

Times ``studio.world.train.train_loras`` (what ``studio run pipelines/world.toml`` runs for each zoo
group) on the shipped base (assets/world UNet, fp32 weights, bf16 autocast on GPU) at the build's
group size: ``--styles`` LoRAs trained together, ``--per-style`` images of each per step. Latents
and text states are random tensors of the build's shapes (a step's time does not depend on the
values). Rows:

- ``zoo (UpdateHooks)``: the zoo as it is now (the engine's one update mechanism).
- ``zoo (old hook)``: the per-sample hook world/multilora.py had before (its own bmm in a forward
  hook), same loop, same data: the merge must not have slowed the zoo down.
- ``one LoRA``: a group of one style at the same per-style batch; x styles is what training the
  LoRAs one after another would cost (the speed trick's worth).

    python benchmarks/world_zoo.py                              # CUDA, the build's size (14 x 16)
    python benchmarks/world_zoo.py --device cpu --styles 2 --per-style 2 --steps 3 --warmup 1   # CPU smoke
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch import Tensor, nn

if __package__ in (None, ""):  # run as a script: make the repository importable
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from studio.world.models import make_scheduler  # noqa: E402
from studio.world.multilora import MultiLora  # noqa: E402
from studio.world.train import Plan, ZooData, train_loras  # noqa: E402
from studio.world.zoo import load_base  # noqa: E402

WORLD = Path(__file__).resolve().parents[1] / "assets" / "world"


class OldHookLora(MultiLora):
    """MultiLora with the forward hook it had before it moved onto UpdateHooks (the reference)."""

    def __init__(self, unet: nn.Module, *args, **kwargs):
        super().__init__(unet, *args, **kwargs)
        self.remove()
        modules = dict(unet.named_modules())
        self._old = [modules[name].register_forward_hook(self._old_hook(i)) for i, name in enumerate(self.names)]

    def _old_hook(self, i: int):
        def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
            if self.index is None:
                return output
            x = inputs[0]
            a = self.down[i][self.index].to(x.dtype)
            b = self.up[i][self.index].to(x.dtype)
            flat = x.reshape(x.shape[0], -1, x.shape[-1])
            delta = torch.bmm(torch.bmm(flat, a.transpose(1, 2)), b.transpose(1, 2))
            return output + (self.strength * self.alpha / self.rank) * delta.reshape(output.shape).to(output.dtype)
        return hook

    def remove(self) -> None:
        super().remove()
        for handle in getattr(self, "_old", []):
            handle.remove()
        self._old = []


def _data(unet: nn.Module, styles: int, pool: int, device: torch.device) -> ZooData:
    gen = torch.Generator().manual_seed(0)
    size, channels = unet.config.sample_size, unet.config.in_channels
    latents = torch.randn((styles * pool, channels, size, size), generator=gen).to(device)
    states = torch.randn((styles * pool, 20, unet.config.cross_attention_dim), generator=gen).to(device)
    return ZooData(latents, states, [torch.arange(s * pool, (s + 1) * pool, device=device) for s in range(styles)])


def _ms_per_step(kind: type, unet: nn.Module, styles: int, args: argparse.Namespace, device: torch.device) -> float:
    data = _data(unet, styles, args.pool, device)
    lora = kind(unet, styles, 8, 8.0, seed=0).to(device)
    scheduler = make_scheduler()
    for _ in train_loras(lora, unet, data, Plan(args.warmup, args.per_style, 2e-3, 0), scheduler):
        pass
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in train_loras(lora, unet, data, Plan(args.steps, args.per_style, 2e-3, 1), scheduler):
        pass
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    lora.remove()
    return 1000 * seconds / args.steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--styles", type=int, default=14, help="LoRAs trained together (the build's zoo_group)")
    parser.add_argument("--per-style", type=int, default=16, help="images per style and step (the build's lora_per_style)")
    parser.add_argument("--pool", type=int, default=64, help="training latents per style")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=20)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
    unet, _ = load_base(WORLD, device)
    rows = [
        ("zoo (UpdateHooks)", args.styles, _ms_per_step(MultiLora, unet, args.styles, args, device)),
        ("zoo (old hook)", args.styles, _ms_per_step(OldHookLora, unet, args.styles, args, device)),
        ("one LoRA", 1, _ms_per_step(MultiLora, unet, 1, args, device)),
    ]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"world zoo step on {name}: {args.styles} styles x {args.per_style} images, {args.steps} timed steps after {args.warmup}")
    print(f"{'row':<20} {'styles':>6} {'ms/step':>9} {'ms per style-step':>18}")
    for label, styles, ms in rows:
        print(f"{label:<20} {styles:>6} {ms:>9.1f} {ms / styles:>18.2f}")
    print(f"training the {args.styles} LoRAs one after another: {rows[2][2] * args.styles:.1f} ms per step of all styles "
          f"({rows[2][2] * args.styles / rows[0][2]:.1f}x the zoo's)")


if __name__ == "__main__":
    main()
