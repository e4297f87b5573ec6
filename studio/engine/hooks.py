"""Updates added by forward hooks: per-image batches, training, a multi-LoRA zoo.

Reached through ``studio.engine.patch`` (the one way of putting an update onto a module; see its
docstring). A chain is a sequence of matrices applied in turn to a layer's input (``(down, up)``
for a LoRA, ``(V, core, U)`` for a shared basis, ``(dW,)`` for a dense update). A 2-D matrix
applies to every row; a 3-D one (n, o, i) gives row b its entry ``b % n``, as one batched matmul.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from studio.adapters.base import capabilities
from studio.errors import ConfigError

Chain = Sequence[Tensor]


def _per_row(step: Tensor, rows: int, memo: dict | None, key: tuple) -> Tensor:
    """A per-sample step (n, o, i) repeated so that row b gets entry b % n (memoised for inference)."""
    n = step.shape[0]
    if rows % n:
        raise RuntimeError(f"a batch of {rows} rows does not split into {n} samples")
    if rows == n:
        return step
    if memo is not None and key in memo:
        return memo[key]
    repeated = step.repeat(rows // n, 1, 1)
    if memo is not None:
        memo[key] = repeated
    return repeated


def _linear_step(h: Tensor, step: Tensor, memo: dict | None, index: int) -> Tensor:
    if step.dim() == 2:
        return F.linear(h, step)
    weights = _per_row(step, h.shape[0], memo, (index, h.shape[0]))
    h3 = h.reshape(h.shape[0], -1, h.shape[-1])
    return torch.bmm(h3, weights.transpose(1, 2)).reshape(*h.shape[:-1], step.shape[1])


def _linear_chain(x: Tensor, chain: Chain, out: Tensor | None, memo: dict | None) -> Tensor | None:
    """The chain applied to x; with ``out`` the last step is added into it in place (returns None)."""
    h = x
    last = len(chain) - 1
    for index, step in enumerate(chain):
        step = step if step.dtype == x.dtype else step.to(x.dtype)
        if out is not None and index == last and out.is_contiguous():
            if step.dim() == 2:
                out.view(-1, out.shape[-1]).addmm_(h.reshape(-1, h.shape[-1]), step.t())
            else:
                weights = _per_row(step, h.shape[0], memo, (index, h.shape[0]))
                out.view(out.shape[0], -1, out.shape[-1]).baddbmm_(h.reshape(h.shape[0], -1, h.shape[-1]), weights.transpose(1, 2))
            return None
        h = _linear_step(h, step, memo, index)
    if out is not None:
        out.add_(h)
        return None
    return h


def _conv_shared(module: nn.Conv2d, x: Tensor, chain: Chain) -> Tensor:
    """A chain on a conv: the first step is a kernel with the layer's own geometry, the rest 1x1."""
    first = chain[0].to(x.dtype)
    kernel = first.reshape(first.shape[0], module.in_channels, *module.kernel_size)
    h = module._conv_forward(x, kernel, None)
    for step in chain[1:]:
        h = F.conv2d(h, step.to(x.dtype).reshape(step.shape[0], step.shape[1], 1, 1))
    return h


def _conv_chain(module: nn.Conv2d, x: Tensor, chain: Chain, out: Tensor | None, memo: dict | None) -> Tensor | None:
    if module.groups != 1:
        raise ConfigError(f"grouped convolutions (groups={module.groups}) cannot be targeted")
    if all(step.dim() == 2 for step in chain):
        term = _conv_shared(module, x, chain)
        if out is None:
            return term
        out.add_(term)
        return None
    n = next(step.shape[0] for step in chain if step.dim() == 3)
    if x.shape[0] % n:
        raise RuntimeError(f"a batch of {x.shape[0]} rows does not split into {n} samples")
    pieces = []
    for entry in range(n):
        if memo is not None and _zero_entry(chain, entry, memo):
            continue  # an image without an update of this layer: skip its convolution
        term = _conv_shared(module, x[entry::n], [step[entry] if step.dim() == 3 else step for step in chain])
        if out is not None:
            out[entry::n].add_(term)
        else:
            pieces.append((entry, term))
    if out is not None or not pieces:
        return None if out is not None else x.new_zeros(0)
    result = pieces[0][1].new_zeros((x.shape[0], *pieces[0][1].shape[1:]))
    for entry, term in pieces:
        result[entry::n] = term
    return result


def _zero_entry(chain: Chain, entry: int, memo: dict) -> bool:
    key = ("zero", entry)
    if key not in memo:
        memo[key] = any(step.dim() == 3 and not bool(step[entry].any()) for step in chain)
    return memo[key]


def apply_chain(module: nn.Module, x: Tensor, chain: Chain, out: Tensor | None = None, memo: dict | None = None) -> Tensor | None:
    """``chain(x)`` for a Linear or Conv2d module (see the module docstring).

    Without ``out`` returns the term (autograd flows through x and the chain); with ``out`` adds
    it into ``out`` in place and returns None (inference).
    """
    if isinstance(module, nn.Linear):
        return _linear_chain(x, chain, out, memo)
    if isinstance(module, nn.Conv2d):
        return _conv_chain(module, x, chain, out, memo)
    raise ConfigError(f"a {type(module).__name__} cannot take an update (Linear and Conv2d only)")


class UpdateHooks:
    """Forward hooks adding ``source(layer)``'s chain to each layer's output; ``remove()`` undoes.

    ``source(layer)`` returns a chain (or None: nothing this call). ``inference``: the chains are
    fixed tensors on the layer's device and dtype, added in place under no_grad (per-image
    batches); otherwise the term is added out of place with autograd (training). ``exact``: call
    ``source`` with autocast disabled, so adapter math runs in the adapter's own precision.
    """

    def __init__(self, modules: dict[str, nn.Module], source: Callable[[str], Chain | None], inference: bool = False,
                 exact: bool = False):
        self.source, self.inference, self.exact = source, inference, exact
        self._memo: dict[str, dict] = {layer: {} for layer in modules}
        self.handles = [module.register_forward_hook(self._hook(layer)) for layer, module in modules.items()]

    def _chain(self, layer: str, device_type: str) -> Chain | None:
        if not self.exact:
            return self.source(layer)
        with torch.autocast(device_type, enabled=False):
            return self.source(layer)

    def _hook(self, layer: str) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
            x = args[0]
            chain = self._chain(layer, x.device.type)
            if chain is None:
                return output
            if self.inference:
                apply_chain(module, x, chain, output, self._memo[layer])
                return output
            term = apply_chain(module, x, chain)
            return output + term.to(output.dtype)

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


class Attachment:
    """A trainable adapter attached to frozen pipeline components; ``detach()`` undoes it.

    ``components`` maps component names to modules ({"unet": ..., "text_encoder": ...}); layer
    names say which component holds them. Every layer gets an ``UpdateHooks`` hook: ``(down, up)``
    for families that declare factors, ``(dW,)`` otherwise. The frozen weights are never
    rewritten: a bf16 weight plus a small dW would be rounded to bf16 in every forward, so the
    adapter the optimizer sees would not be the one generation applies in full precision.
    ``computes_layers_together``: ``all_factors()`` / ``deltas()`` run once per forward of each
    component (a pre-hook) and the layers read that cache. Adapter math runs in fp32 outside
    autocast; the adapter is never registered as a submodule of a component. ``enabled = False``
    passes every output through unchanged (baseline samples next to training samples).
    """

    def __init__(self, components: dict[str, nn.Module], adapter: Any):
        self.components, self.adapter = components, adapter
        caps = capabilities(adapter)
        self.use_factors, self.together = caps.factors, caps.layers_together
        self.enabled = True
        self.cache: dict[str, Any] = {}
        self.handles: list[Any] = []
        modules = {layer: _component_module(components, layer) for layer in adapter.layers()}
        if self.together:
            owners = sorted({layer.partition(".")[0] for layer in modules})
            self.handles += [components[owner].register_forward_pre_hook(self._refresh) for owner in owners]
        self.hooks: UpdateHooks | None = UpdateHooks(modules, self._chain, exact=True)

    def _refresh(self, *_: Any) -> None:
        if self.enabled:
            bulk = self.adapter.all_factors if self.use_factors else self.adapter.deltas
            self.cache = dict(bulk())

    def _get(self, layer: str) -> Any:
        if layer in self.cache:
            return self.cache[layer]
        return self.adapter.factors(layer) if self.use_factors else self.adapter.delta(layer)

    def _chain(self, layer: str) -> Chain | None:
        if not self.enabled:
            return None
        update = self._get(layer)
        return tuple(update) if self.use_factors else (update,)

    def clear(self) -> None:
        """Drop the per-forward cache (and the autograd graph it may hold)."""
        self.cache = {}

    def detach(self) -> None:
        """Remove every hook; the components are as before."""
        if self.hooks is not None:
            self.hooks.remove()
        for handle in self.handles:
            handle.remove()
        self.handles, self.cache, self.hooks = [], {}, None


def _component_module(components: dict[str, nn.Module], layer: str) -> nn.Module:
    owner, _, name = layer.partition(".")
    if owner not in components:
        raise ConfigError(f"layer {layer!r}: the base has no {owner!r} to adapt (it has {', '.join(components)})")
    module = components[owner].get_submodule(name)
    if not isinstance(module, (nn.Linear, nn.Conv2d)):
        raise ConfigError(f"layer {layer!r} is a {type(module).__name__}, not a Linear or Conv2d")
    return module
