"""Many LoRAs on one frozen UNet at once, one per sample of the batch.

The zoo trains several styles together: each sample carries a style index, and every targeted
linear layer adds ``scale * B[s] A[s] x`` for its sample's style s (a forward hook, so module
names stay the UNet's own). The styles' gradients never mix, so this equals training each LoRA
alone, at a fraction of the launch overhead of a tiny model. ``adapter(s)`` exports one style as
the studio's ``LoraAdapter``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from studio.adapters.lora import LoraAdapter, LoraLayer

DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def target_modules(unet: nn.Module, suffixes: tuple[str, ...] = DEFAULT_TARGETS) -> list[str]:
    """UNet linear layers inside transformer blocks whose names end with one of ``suffixes``."""
    return [
        name for name, module in unet.named_modules()
        if isinstance(module, nn.Linear) and "transformer_blocks" in name and any(name.endswith("." + s) for s in suffixes)
    ]


class MultiLora(nn.Module):
    """Per-style LoRA factors for a set of UNet linears, applied by forward hooks."""

    def __init__(self, unet: nn.Module, styles: int, rank: int, alpha: float, targets: tuple[str, ...] = DEFAULT_TARGETS, seed: int = 0):
        super().__init__()
        self.rank, self.alpha, self.styles = rank, float(alpha), styles
        self.names = target_modules(unet, targets)
        if not self.names:
            raise ValueError(f"no UNet linear layer matches the LoRA targets {targets}")
        modules = dict(unet.named_modules())
        gen = torch.Generator().manual_seed(seed)
        self.down = nn.ParameterList()
        self.up = nn.ParameterList()
        for name in self.names:
            linear = modules[name]
            bound = 1 / math.sqrt(linear.in_features)
            a = (torch.rand(styles, rank, linear.in_features, generator=gen) * 2 - 1) * bound
            self.down.append(nn.Parameter(a.to(linear.weight.device)))
            self.up.append(nn.Parameter(torch.zeros(styles, linear.out_features, rank, device=linear.weight.device)))
        self.index: Tensor | None = None
        self.strength = 1.0
        self._handles = [modules[name].register_forward_hook(self._hook(i)) for i, name in enumerate(self.names)]

    def _hook(self, i: int):
        def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
            if self.index is None:
                return output
            x = inputs[0]
            a = self.down[i][self.index].to(x.dtype)  # (B, r, in)
            b = self.up[i][self.index].to(x.dtype)  # (B, out, r)
            flat = x.reshape(x.shape[0], -1, x.shape[-1])
            delta = torch.bmm(torch.bmm(flat, a.transpose(1, 2)), b.transpose(1, 2))
            return output + (self.strength * self.alpha / self.rank) * delta.reshape(output.shape).to(output.dtype)
        return hook

    def remove(self) -> None:
        """Take the hooks off the UNet."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def adapter(self, style: int, name: str, metadata: dict[str, str] | None = None) -> LoraAdapter:
        """Style ``style``'s factors as a LoraAdapter keyed ``unet.<module>`` (float32, CPU)."""
        layers = {
            f"unet.{module}": LoraLayer(
                down=self.down[i][style].detach().float().cpu().contiguous(),
                up=self.up[i][style].detach().float().cpu().contiguous(),
                alpha=self.alpha,
            )
            for i, module in enumerate(self.names)
        }
        return LoraAdapter(name=name, lora_layers=layers, metadata=dict(metadata or {}), base_arch="world")


def merged(unet: nn.Module, adapter: LoraAdapter, strength: float = 1.0):
    """Context manager: ``unet`` with W + strength * dW written in, restored afterwards."""
    return _Merged(unet, adapter, strength)


class _Merged:
    def __init__(self, unet: nn.Module, adapter: LoraAdapter, strength: float):
        self.unet, self.adapter, self.strength = unet, adapter, strength
        self.saved: dict[str, Tensor] = {}

    def __enter__(self) -> nn.Module:
        modules = dict(self.unet.named_modules())
        for key in self.adapter.layers():
            name = key.removeprefix("unet.")
            if name not in modules:
                raise KeyError(f"adapter layer {key!r} is not a UNet module")
            weight = modules[name].weight
            self.saved[name] = weight.detach().clone()
            with torch.no_grad():
                weight += self.strength * self.adapter.delta(key).to(weight.dtype).to(weight.device).view_as(weight)
        return self.unet

    def __exit__(self, *exc) -> None:
        modules = dict(self.unet.named_modules())
        with torch.no_grad():
            for name, weight in self.saved.items():
                modules[name].weight.copy_(weight)
