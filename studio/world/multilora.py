"""Many LoRAs on one frozen UNet at once, one per sample of the batch (the zoo's speed trick).

The zoo trains several styles together: each sample carries a style index, and every targeted
linear layer adds ``scale * B[s] A[s] x`` for its sample's style s. The update is put onto the
layers the engine's one way (``studio.engine.patch.UpdateHooks``): each layer's chain is the
per-sample pair ``(A[index], scale * B[index])``, a 3-D factor that gives row b the entry of its
own style, as one batched matmul. The styles' gradients never mix, so (with the zoo's loss, a sum
of per-style means) this equals training each LoRA alone, at a fraction of the launch overhead
of a tiny model. ``adapter(s)`` exports one style as the studio's ``LoraAdapter``; evaluating one
merges it with ``studio.engine.patch.merged``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from studio.adapters.lora import LoraAdapter, LoraLayer
from studio.engine.patch import Chain, UpdateHooks
from studio.errors import ConfigError

DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def target_modules(unet: nn.Module, suffixes: tuple[str, ...] = DEFAULT_TARGETS) -> list[str]:
    """UNet linear layers inside transformer blocks whose names end with one of ``suffixes``."""
    return [
        name for name, module in unet.named_modules()
        if isinstance(module, nn.Linear) and "transformer_blocks" in name and any(name.endswith("." + s) for s in suffixes)
    ]


class MultiLora(nn.Module):
    """Per-style LoRA factors for a set of UNet linears, added by the engine's update hooks.

    ``index`` (a (B,) int64 tensor on the UNet's device, or None: no update) says which style
    each sample of the next forward uses; ``strength`` scales every update.
    """

    def __init__(self, unet: nn.Module, styles: int, rank: int, alpha: float, targets: tuple[str, ...] = DEFAULT_TARGETS, seed: int = 0):
        super().__init__()
        self.rank, self.alpha, self.styles = rank, float(alpha), styles
        self.names = target_modules(unet, targets)
        if not self.names:
            raise ConfigError(f"lora_targets {list(targets)}: no UNet linear layer of a transformer block matches")
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
        self._position = {name: i for i, name in enumerate(self.names)}
        self._hooks: UpdateHooks | None = UpdateHooks({name: modules[name] for name in self.names}, self._chain)

    def _chain(self, name: str) -> Chain | None:
        """(A[index], scale * B[index]) of layer ``name``: row b gets its own style's factors."""
        if self.index is None:
            return None
        i = self._position[name]
        return self.down[i][self.index], self.up[i][self.index] * (self.strength * self.alpha / self.rank)

    def remove(self) -> None:
        """Take the hooks off the UNet."""
        if self._hooks is not None:
            self._hooks.remove()
            self._hooks = None

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
