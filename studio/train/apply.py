"""Attach a trainable adapter to a pipeline's modules without touching their weights.

Every targeted Linear / Conv2d gets a forward hook that adds the adapter's term to the module's
output: ``up(down(x))`` for families with low-rank factors, ``x @ dW^T`` (a convolution with the
dW kernel) for families that only give ``delta(layer)``. The frozen weights are never rewritten:
a bf16 base weight plus a small dW would be rounded to bf16 in every forward, so the adapter the
optimizer sees would differ from the one generation applies in full precision.

Families whose layers share one vector answer ``all_factors()`` / ``deltas()``; a forward
pre-hook on each component then computes every layer once per forward and the layers read the
cache. The adapter is never registered as a submodule of the pipeline (its parameters stay its own).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from studio.errors import ConfigError


def _dense(module: nn.Module, x: Tensor, delta: Tensor) -> Tensor:
    """x through dW alone, for a Linear or Conv2d module, in x's dtype."""
    delta = delta.to(x.dtype).reshape(module.weight.shape)
    if isinstance(module, nn.Linear):
        return F.linear(x, delta)
    return F.conv2d(x, delta, None, module.stride, module.padding, module.dilation, module.groups)


def _lowrank(module: nn.Module, x: Tensor, down: Tensor, up: Tensor) -> Tensor:
    """up(down(x)) for a Linear or Conv2d module, in x's dtype."""
    down, up = down.to(x.dtype), up.to(x.dtype)
    if isinstance(module, nn.Linear):
        return F.linear(F.linear(x, down), up)
    if module.groups != 1:
        raise ConfigError(f"grouped convolutions (groups={module.groups}) cannot be targeted")
    kernel = down.reshape(down.shape[0], module.in_channels, *module.kernel_size)
    hidden = F.conv2d(x, kernel, None, module.stride, module.padding, module.dilation)
    return F.conv2d(hidden, up[:, :, None, None])


class Attached:
    """A live attachment of ``adapter`` to a pipeline's ``components`` ({"unet": ..., "text_encoder": ...});
    ``detach()`` takes every hook off again."""

    def __init__(self, components: dict[str, nn.Module], adapter: Any):
        self.components, self.adapter = components, adapter
        self.use_factors = callable(getattr(adapter, "factors", None))
        bulk_name = "all_factors" if self.use_factors else "deltas"
        self.bulk: Callable[[], dict] | None = getattr(adapter, bulk_name, None)
        self.cache: dict[str, Any] = {}
        self.handles: list[Any] = []
        self.enabled = True  # False: the hooks pass outputs through (baseline samples)
        self.modules = {layer: self._module(layer) for layer in adapter.layers()}
        if self.bulk is not None:
            owners = {layer.partition(".")[0] for layer in self.modules}
            self.handles += [components[owner].register_forward_pre_hook(self._refresh) for owner in sorted(owners)]
        for layer, module in self.modules.items():
            self._attach(layer, module)

    def _module(self, layer: str) -> nn.Module:
        owner, _, name = layer.partition(".")
        if owner not in self.components:
            raise ConfigError(f"layer {layer!r}: the base has no {owner!r} to train (it has {', '.join(self.components)})")
        module = self.components[owner].get_submodule(name)
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            raise ConfigError(f"layer {layer!r} is a {type(module).__name__}, not a Linear or Conv2d")
        return module

    def _exact(self, fn: Callable[[], Any]) -> Any:
        """Run an adapter computation in its own precision (fp32), outside any autocast region."""
        param = next(iter(self.adapter.parameters()), None)
        device_type = param.device.type if param is not None else "cpu"
        with torch.autocast(device_type, enabled=False):
            return fn()

    def _refresh(self, *_: Any) -> None:
        if self.enabled:
            self.cache = dict(self._exact(self.bulk))

    def _get(self, layer: str) -> Any:
        if layer in self.cache:
            return self.cache[layer]
        return self._exact(lambda: self.adapter.factors(layer) if self.use_factors else self.adapter.delta(layer))

    def _attach(self, layer: str, module: nn.Module) -> None:
        def hook(mod: nn.Module, args: tuple, output: Tensor, layer: str = layer) -> Tensor:
            if not self.enabled:
                return output
            if self.use_factors:
                down, up = self._get(layer)
                return output + _lowrank(mod, args[0], down, up).to(output.dtype)
            return output + _dense(mod, args[0], self._get(layer)).to(output.dtype)
        self.handles.append(module.register_forward_hook(hook))

    def clear(self) -> None:
        """Drop the per-forward cache (and the graph it may hold)."""
        self.cache = {}

    def detach(self) -> None:
        """Remove every hook; the modules are as before."""
        for handle in self.handles:
            handle.remove()
        self.handles, self.cache = [], {}


class Trainee(nn.Module):
    """UNet + adapter in one module, so accelerate/DDP see the adapter's parameters."""

    def __init__(self, unet: nn.Module, adapter: nn.Module):
        super().__init__()
        self.unet = unet
        self.adapter = adapter

    def forward(self, sample: Tensor, timesteps: Tensor, conditioning: dict[str, Any]) -> Tensor:
        return self.unet(sample, timesteps, **conditioning, return_dict=False)[0]


def trainable_parameters(adapter: nn.Module) -> list[nn.Parameter]:
    """The adapter's trainable numbers (frozen components excluded)."""
    return [p for p in adapter.parameters() if p.requires_grad]


def count_trainable(adapter: nn.Module) -> int:
    return sum(p.numel() for p in trainable_parameters(adapter))


def freeze(*modules: nn.Module) -> None:
    for module in modules:
        module.requires_grad_(False)
        module.eval()
