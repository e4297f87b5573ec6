"""Put a trainable adapter onto a frozen UNet without knowing its family.

Two mechanisms, chosen by what the adapter answers:
- ``factors(layer)``: an unmerged forward hook, ``y = W0 x + up(down x)`` (for convs, ``down`` is
  a conv with the layer's kernel, stride and padding and ``up`` a 1x1 conv); never builds dW.
- otherwise ``delta(layer)``: ``torch.nn.utils.parametrize`` on the weight, ``W = W0 + dW``.

Families whose layers share one vector answer ``all_factors()`` / ``deltas()``; a forward
pre-hook on the UNet then computes every layer once per UNet call and the layers read the cache.
The adapter is never registered as a submodule of the UNet (its parameters stay its own).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from studio.errors import ConfigError


class _AddDelta(nn.Module):
    """Parametrisation ``W0 -> W0 + dW`` reading dW through a getter (holds no parameters)."""

    def __init__(self, get: Callable[[], Tensor]):
        super().__init__()
        self._get = get

    def forward(self, weight: Tensor) -> Tensor:
        return weight + self._get().reshape(weight.shape).to(weight.dtype)


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
    """A live attachment of ``adapter`` to ``unet``; ``detach()`` restores the pristine modules."""

    def __init__(self, unet: nn.Module, adapter: Any, component: str = "unet"):
        self.unet, self.adapter = unet, adapter
        self.use_factors = callable(getattr(adapter, "factors", None))
        bulk_name = "all_factors" if self.use_factors else "deltas"
        self.bulk: Callable[[], dict] | None = getattr(adapter, bulk_name, None)
        self.cache: dict[str, Any] = {}
        self.handles: list[Any] = []
        self.parametrized: list[nn.Module] = []
        self.modules = {layer: self._module(layer, component) for layer in adapter.layers()}
        if self.bulk is not None:
            self.handles.append(unet.register_forward_pre_hook(self._refresh))
        for layer, module in self.modules.items():
            self._attach(layer, module)

    def _module(self, layer: str, component: str) -> nn.Module:
        owner, _, name = layer.partition(".")
        if owner != component:
            raise ConfigError(f"layer {layer!r}: only {component} layers can be trained (text encoder training is not supported)")
        module = self.unet.get_submodule(name)
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
        self.cache = dict(self._exact(self.bulk))

    def _get(self, layer: str) -> Any:
        if layer in self.cache:
            return self.cache[layer]
        return self._exact(lambda: self.adapter.factors(layer) if self.use_factors else self.adapter.delta(layer))

    def _attach(self, layer: str, module: nn.Module) -> None:
        if self.use_factors:
            def hook(mod: nn.Module, args: tuple, output: Tensor, layer: str = layer) -> Tensor:
                down, up = self._get(layer)
                return output + _lowrank(mod, args[0], down, up)
            self.handles.append(module.register_forward_hook(hook))
        else:
            parametrize.register_parametrization(module, "weight", _AddDelta(lambda layer=layer: self._get(layer)), unsafe=True)
            self.parametrized.append(module)

    def clear(self) -> None:
        """Drop the per-forward cache (and the graph it may hold)."""
        self.cache = {}

    def detach(self) -> None:
        """Remove every hook and parametrisation; the UNet is as before."""
        for handle in self.handles:
            handle.remove()
        for module in self.parametrized:
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
        self.handles, self.parametrized, self.cache = [], [], {}


class Trainee(nn.Module):
    """UNet + adapter in one module, so accelerate/DDP see the adapter's parameters."""

    def __init__(self, unet: nn.Module, adapter: nn.Module):
        super().__init__()
        self.unet = unet
        self.adapter = adapter

    def forward(self, sample: Tensor, timesteps: Tensor, encoder_hidden_states: Tensor) -> Tensor:
        return self.unet(sample, timesteps, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]


def trainable_parameters(adapter: nn.Module) -> list[nn.Parameter]:
    """The adapter's trainable numbers (frozen components excluded)."""
    return [p for p in adapter.parameters() if p.requires_grad]


def count_trainable(adapter: nn.Module) -> int:
    return sum(p.numel() for p in trainable_parameters(adapter))


def freeze(*modules: nn.Module) -> None:
    for module in modules:
        module.requires_grad_(False)
        module.eval()
