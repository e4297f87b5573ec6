"""Several adapters in one batch, one per image: W0 x once, plus each image's own update.

The live weights stay pristine. A forward hook on every targeted layer adds each image's term
to the layer's output and is removed afterwards (no wrapper modules stay behind):

- a shared-basis collection (every adapter of the layer answers ``basis`` with the same
  tensors): ``h = x V^T`` once for the whole batch, then each image's ``K x K`` core, then ``U``;
- low-rank adapters: a gathered batched matmul (LoRAX / Punica style): the images' factors are
  stacked, zero-padded to one rank, and applied with one broadcast ``matmul`` per factor;
- anything else (an adapter that only answers ``delta``): each image's dense dW, batched.

Rows map to images by ``row % n_images``: classifier-free guidance runs ``[uncond; cond]``, so
both halves of image i (rows i and n + i) get image i's adapter; text encoders see n rows.
Conv layers loop over images with the module's own stride and padding.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Literal, Protocol, Sequence, runtime_checkable

import torch
from torch import Tensor, nn

from studio.adapters.base import Adapter
from studio.engine.live import check_layers
from studio.engine.mix import Mix

PathKind = Literal["shared", "factors", "dense"]


@runtime_checkable
class SharedBasisAdapter(Protocol):
    """An adapter of a compressed collection: ``delta = up_basis @ core @ down_basis``.

    ``basis(layer)`` must return the collection's own tensors (the same objects, or views of the
    same storage, for every adapter of the collection): that is how the engine sees that
    ``x @ down_basis.T`` can be computed once for a whole batch.
    """

    def layers(self) -> list[str]: ...

    def delta(self, layer: str) -> Tensor: ...

    def basis(self, layer: str) -> tuple[Tensor, Tensor]:
        """``(down_basis (K, in_flat), up_basis (out, K))``, shared by the collection."""
        ...

    def core(self, layer: str) -> Tensor:
        """``(K, K)`` loadings product with ``delta(layer) == up_basis @ core @ down_basis``."""
        ...


@dataclass
class PerImageLayer:
    """One layer's per-image terms, on the layer's device and dtype."""

    kind: PathKind
    n_images: int
    first: Tensor  # shared: V^T (in, K); factors: downs^T (n, in, R); dense: dW^T (n, in, out)
    middle: Tensor | None = None  # shared: cores^T (n, K, K)
    last: Tensor | None = None  # shared: U^T (K, out); factors: ups^T (n, R, out)

    def linear_term(self, x: Tensor) -> Tensor:
        """Each row's own update applied to its input, shape of the layer's output."""
        rows, n = x.shape[0], self.n_images
        if rows % n:
            raise RuntimeError(f"a batch of {rows} rows does not split into {n} images")
        xs = x.reshape(rows // n, n, -1, x.shape[-1])
        if self.kind == "shared":
            y = ((xs @ self.first) @ self.middle) @ self.last
        elif self.kind == "factors":
            y = (xs @ self.first) @ self.last
        else:
            y = xs @ self.first
        return y.reshape(*x.shape[:-1], y.shape[-1])


@dataclass
class PerImageConv:
    """One conv layer's per-image dense kernels (None: image without an update here)."""

    kernels: list[Tensor | None]

    def add_into(self, module: nn.Conv2d, x: Tensor, output: Tensor) -> None:
        n = len(self.kernels)
        if x.shape[0] % n:
            raise RuntimeError(f"a batch of {x.shape[0]} rows does not split into {n} images")
        for image, kernel in enumerate(self.kernels):
            if kernel is not None:
                output[image::n].add_(module._conv_forward(x[image::n], kernel, None))


def _terms_for(layer: str, mix: Mix | None) -> list[tuple[Adapter, float]]:
    if mix is None:
        return []
    return [(t.adapter, t.weight) for t in mix.terms if t.weight != 0 and layer in _layer_set(t.adapter)]


_LAYER_SETS: dict[int, tuple[Adapter, frozenset[str]]] = {}


def _layer_set(adapter: Adapter) -> frozenset[str]:
    cached = _LAYER_SETS.get(id(adapter))
    if cached is None or cached[0] is not adapter:
        cached = (adapter, frozenset(adapter.layers()))
        _LAYER_SETS[id(adapter)] = cached
    return cached[1]


def _storage_key(tensor: Tensor) -> tuple:
    return (tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()), tensor.device, tensor.dtype)


def path_kind(layer: str, adapters: Sequence[Adapter]) -> PathKind:
    """Which batched path fits every adapter of this layer."""
    if all(isinstance(a, SharedBasisAdapter) and hasattr(a, "basis") and hasattr(a, "core") for a in adapters):
        keys = {tuple(_storage_key(t) for t in a.basis(layer)) for a in adapters}
        if len(keys) == 1:
            return "shared"
    if all(hasattr(a, "factors") for a in adapters):
        return "factors"
    return "dense"


def build_linear(layer: str, per_image: list[list[tuple[Adapter, float]]], shape: tuple[int, int],
                 device: torch.device, dtype: torch.dtype) -> PerImageLayer:
    """Stack the images' terms of a linear layer for the batched path that fits them."""
    adapters = [a for terms in per_image for a, _ in terms]
    kind = path_kind(layer, adapters)
    n = len(per_image)
    to = {"device": device, "dtype": dtype}
    if kind == "shared":
        down_basis, up_basis = adapters[0].basis(layer)
        k = down_basis.shape[0]
        cores = torch.zeros(n, k, k)
        for image, terms in enumerate(per_image):
            for adapter, weight in terms:
                cores[image] += weight * adapter.core(layer).float()
        return PerImageLayer(kind, n, down_basis.float().T.to(**to).contiguous(), cores.transpose(1, 2).to(**to).contiguous(),
                             up_basis.float().T.to(**to).contiguous())
    if kind == "factors":
        downs, ups = _stacked_factors(layer, per_image, shape)
        return PerImageLayer(kind, n, downs.transpose(1, 2).to(**to).contiguous(), None, ups.transpose(1, 2).to(**to).contiguous())
    dense = torch.stack([_dense_sum(layer, terms, shape) for terms in per_image])
    return PerImageLayer(kind, n, dense.transpose(1, 2).to(**to).contiguous())


def _stacked_factors(layer: str, per_image: list[list[tuple[Adapter, float]]], shape: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Per image, the mix's factors concatenated along the rank, zero-padded to one rank."""
    pairs = []
    for terms in per_image:
        downs, ups = [], []
        for adapter, weight in terms:
            down, up = adapter.factors(layer)
            downs.append(down.reshape(down.shape[0], -1).float())
            ups.append(weight * up.reshape(shape[0], -1).float())
        pairs.append((torch.cat(downs) if downs else None, torch.cat(ups, dim=1) if ups else None))
    rank = max([1] + [down.shape[0] for down, _ in pairs if down is not None])
    downs_out = torch.zeros(len(pairs), rank, shape[1])
    ups_out = torch.zeros(len(pairs), shape[0], rank)
    for image, (down, up) in enumerate(pairs):
        if down is not None:
            downs_out[image, : down.shape[0]] = down
            ups_out[image, :, : up.shape[1]] = up
    return downs_out, ups_out


def _dense_sum(layer: str, terms: list[tuple[Adapter, float]], shape: tuple[int, int]) -> Tensor:
    total = torch.zeros(shape)
    for adapter, weight in terms:
        total += weight * adapter.delta(layer).float().reshape(shape)
    return total


def build_conv(layer: str, per_image: list[list[tuple[Adapter, float]]], weight: Tensor) -> PerImageConv:
    shape = (weight.shape[0], weight[0].numel())
    kernels = [
        _dense_sum(layer, terms, shape).reshape(weight.shape).to(weight.device, weight.dtype) if terms else None
        for terms in per_image
    ]
    return PerImageConv(kernels)


def _hook_for(plan: PerImageLayer | PerImageConv):
    def hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        x = args[0]
        if isinstance(plan, PerImageConv):
            plan.add_into(module, x, output)
            return output
        return output.add_(plan.linear_term(x))

    return hook


@torch.no_grad()
def per_image_plans(modules: dict[str, nn.Module], assignments: Sequence[Mix | None]) -> dict[str, PerImageLayer | PerImageConv]:
    """For every layer any image's mix targets, that layer's per-image terms."""
    layers: dict[str, None] = {}
    for mix in assignments:
        for term in (mix.terms if mix else ()):
            check_layers(term.adapter, modules, term.label)
            layers.update(dict.fromkeys(term.adapter.layers()))
    plans: dict[str, PerImageLayer | PerImageConv] = {}
    for layer in layers:
        per_image = [_terms_for(layer, mix) for mix in assignments]
        if not any(per_image):
            continue
        weight = modules[layer].weight
        if isinstance(modules[layer], nn.Conv2d):
            plans[layer] = build_conv(layer, per_image, weight)
        else:
            plans[layer] = build_linear(layer, per_image, tuple(weight.shape), weight.device, weight.dtype)
    return plans


@contextlib.contextmanager
def per_image_hooks(modules: dict[str, nn.Module], assignments: Sequence[Mix | None]) -> Iterator[int]:
    """Hook each image's adapter into the (pristine) modules; removed on exit. Yields the hook count."""
    plans = per_image_plans(modules, assignments)
    handles = [modules[layer].register_forward_hook(_hook_for(plan)) for layer, plan in plans.items()]
    try:
        yield len(handles)
    finally:
        for handle in handles:
            handle.remove()
