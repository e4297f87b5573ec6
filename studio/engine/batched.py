"""Several adapters in one batch, one per image: W0 x once, plus each image's own update.

The live weights stay pristine. Every targeted layer gets a forward hook
(``studio.engine.patch.UpdateHooks``, inference mode) that adds each image's term to the
layer's output and is removed afterwards. Per layer, the images' terms are gathered once into
per-image stacks (a segmented / grouped low-rank matmul, as LoRAX and Punica do for LLMs) and
applied as one batched matmul per factor, the last one fused into the output:

- ``shared``: every adapter of the layer declares a shared basis and returns the same tensors
  (a compressed collection): ``h = x V^T`` once for the whole batch, each image's ``K x K``
  core, then ``U`` (one GEMM with the add fused in);
- ``factors``: every adapter declares factors: the images' factors stacked, zero-padded to one
  rank: ``(x @ down[b]^T) @ up[b]^T`` for row b;
- ``dense``: anything else: each image's dense dW, batched.

Row b belongs to image ``b % n`` (classifier-free guidance runs ``[uncond; cond]``, so both
halves of image i get image i's adapter; text encoders see n rows). Conv layers loop over the
images that have an update there, with the module's own stride and padding.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from studio.adapters.base import Adapter, capabilities
from studio.engine.live import PreparedAdapter, check_layers
from studio.engine.mix import Mix, MixTerm
from studio.engine.patch import FactorTerm, UpdateHooks, WeightGroup

PathKind = Literal["shared", "factors", "dense"]
Terms = list[tuple[Adapter, float]]


def _storage_key(tensor: Tensor) -> tuple:
    return (tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()), tensor.device, tensor.dtype)


def path_kind(layer: str, adapters: Sequence[Adapter]) -> PathKind:
    """Which batched path fits every adapter of this layer (from their declared capabilities)."""
    caps = [capabilities(adapter) for adapter in adapters]
    if all(c.shared_basis for c in caps):
        keys = {tuple(_storage_key(t) for t in adapter.basis(layer)) for adapter in adapters}
        if len(keys) == 1:
            return "shared"
    if all(c.factors for c in caps):
        return "factors"
    return "dense"


def _shared_chain(layer: str, per_image: list[Terms]) -> tuple[Tensor, ...]:
    adapters = [adapter for terms in per_image for adapter, _ in terms]
    down_basis, up_basis = adapters[0].basis(layer)
    k = down_basis.shape[0]
    cores = torch.zeros(len(per_image), k, k)
    for image, terms in enumerate(per_image):
        for adapter, weight in terms:
            cores[image] += weight * adapter.core(layer).detach().float().cpu()
    return down_basis.detach().float().reshape(k, -1), cores, up_basis.detach().float().reshape(-1, k)


def _factor_chain(layer: str, per_image: list[Terms], shape: tuple[int, int]) -> tuple[Tensor, ...]:
    """Per image, the mix's factors concatenated along the rank (weights folded into up), zero-padded."""
    pairs = []
    for terms in per_image:
        downs, ups = [], []
        for adapter, weight in terms:
            down, up = adapter.factors(layer)
            downs.append(down.detach().float().cpu().reshape(down.shape[0], -1))
            ups.append(weight * up.detach().float().cpu().reshape(shape[0], -1))
        pairs.append((torch.cat(downs), torch.cat(ups, dim=1)) if downs else None)
    rank = max([1] + [pair[0].shape[0] for pair in pairs if pair is not None])
    downs_out = torch.zeros(len(pairs), rank, shape[1])
    ups_out = torch.zeros(len(pairs), shape[0], rank)
    for image, pair in enumerate(pairs):
        if pair is not None:
            downs_out[image, : pair[0].shape[0]] = pair[0]
            ups_out[image, :, : pair[1].shape[1]] = pair[1]
    return downs_out, ups_out


def _dense_chain(layer: str, per_image: list[Terms], shape: tuple[int, int]) -> tuple[Tensor, ...]:
    dense = torch.zeros(len(per_image), *shape)
    for image, terms in enumerate(per_image):
        for adapter, weight in terms:
            dense[image] += weight * adapter.delta(layer).detach().float().cpu().reshape(shape)
    return (dense,)


def build_chain(layer: str, per_image: list[Terms], weight: Tensor) -> tuple[PathKind, tuple[Tensor, ...]]:
    """The per-image chain of one layer on the weight's device and dtype, and which path it is."""
    shape = (int(weight.shape[0]), int(weight[0].numel()))
    kind = path_kind(layer, [adapter for terms in per_image for adapter, _ in terms])
    if kind == "shared":
        chain = _shared_chain(layer, per_image)
    elif kind == "factors":
        chain = _factor_chain(layer, per_image, shape)
    else:
        chain = _dense_chain(layer, per_image, shape)
    return kind, tuple(step.to(weight.device, weight.dtype).contiguous() for step in chain)


_LAYER_SETS: dict[int, tuple[Adapter, frozenset[str]]] = {}


def _layer_set(adapter: Adapter) -> frozenset[str]:
    cached = _LAYER_SETS.get(id(adapter))
    if cached is None or cached[0] is not adapter:
        cached = (adapter, frozenset(adapter.layers()))
        _LAYER_SETS[id(adapter)] = cached
    return cached[1]


def _terms_for(layer: str, mix: Mix | None) -> Terms:
    if mix is None:
        return []
    return [(t.adapter, t.weight) for t in mix.terms if t.weight != 0 and layer in _layer_set(t.adapter)]


@torch.no_grad()
def per_image_chains(modules: dict[str, nn.Module], assignments: Sequence[Mix | None],
                     prepared: Callable[[MixTerm], PreparedAdapter] | None = None) -> dict[str, tuple[PathKind, tuple[Tensor, ...]]]:
    """For every layer any image's mix targets, that layer's per-image chain.

    With ``prepared`` (the engine's cache of device-resident terms), groups of layers whose
    adapters all have factor terms there are stacked on the device, one copy per group and
    image (no host work per layer); the rest is built layer by layer.
    """
    layers: dict[str, None] = {}
    for mix in assignments:
        for term in (mix.terms if mix else ()):
            check_layers(term.adapter, modules, term.label)
            layers.update(dict.fromkeys(term.adapter.layers()))
    chains = _device_factor_chains(layers, assignments, prepared) if prepared is not None else {}
    for layer in layers:
        if layer in chains:
            continue
        per_image = [_terms_for(layer, mix) for mix in assignments]
        if any(per_image):
            chains[layer] = build_chain(layer, per_image, modules[layer].weight)
    return chains


def _device_factor_chains(layers: dict[str, None], assignments: Sequence[Mix | None],
                          prepared: Callable[[MixTerm], PreparedAdapter]) -> dict[str, tuple[PathKind, tuple[Tensor, ...]]]:
    """Per-image factor chains gathered from prepared group terms (see ``per_image_chains``)."""
    per_image: list[list[tuple[PreparedAdapter, float, bool]]] = [
        [(prepared(t), t.weight, capabilities(t.adapter).shared_basis) for t in (mix.terms if mix else ()) if t.weight != 0]
        for mix in assignments
    ]
    groups = {group: None for entries in per_image for entry, _, _ in entries for group in entry.terms}
    chains: dict[str, tuple[PathKind, tuple[Tensor, ...]]] = {}
    for group in groups:
        images = [[(term, weight) for entry, weight, shared in entries for term in entry.terms.get(group, [])]
                  for entries in per_image]
        if any(shared for entries in per_image for entry, _, shared in entries if group in entry.terms):
            continue  # collections take the shared-basis path, layer by layer
        if any(not isinstance(term, FactorTerm) for terms in images for term, _ in terms):
            continue
        downs, ups = _stack_images(group, images)
        for row, layer in enumerate(group.layers):
            if layer in layers:
                chains[layer] = ("factors", (downs[:, row], ups[:, row]))
    return chains


def _stack_images(group: WeightGroup, images: list[list[tuple[FactorTerm, float]]]) -> tuple[Tensor, Tensor]:
    """(images, rows, R, in) downs and (images, rows, out, R) ups, each image's terms side by side."""
    pairs: list[tuple[Tensor, Tensor] | None] = []
    for terms in images:
        if not terms:
            pairs.append(None)
        elif len(terms) == 1:
            term, weight = terms[0]
            pairs.append((term.down, term.up if weight == 1 else term.up * weight))
        else:
            pairs.append((torch.cat([t.down for t, _ in terms], dim=1), torch.cat([t.up * w for t, w in terms], dim=2)))
    rank = max([1] + [pair[0].shape[1] for pair in pairs if pair is not None])
    n, out_features, in_features = group.live.shape
    zeros = (group.live.new_zeros(n, rank, in_features), group.live.new_zeros(n, out_features, rank))
    padded = [zeros if pair is None else _pad_rank(pair, rank) for pair in pairs]
    return torch.stack([pair[0] for pair in padded]), torch.stack([pair[1] for pair in padded])


def _pad_rank(pair: tuple[Tensor, Tensor], rank: int) -> tuple[Tensor, Tensor]:
    """Zero-pad (down (n, r, in), up (n, out, r)) to rank ``rank`` (exact: zero rows add nothing)."""
    down, up = pair
    missing = rank - down.shape[1]
    if missing == 0:
        return pair
    return F.pad(down, (0, 0, 0, missing)), F.pad(up, (0, missing))


@contextlib.contextmanager
def per_image_hooks(modules: dict[str, nn.Module], assignments: Sequence[Mix | None],
                    prepared: Callable[[MixTerm], PreparedAdapter] | None = None) -> Iterator[int]:
    """Hook each image's adapter into the (pristine) modules; removed on exit. Yields the hook count."""
    chains = per_image_chains(modules, assignments, prepared)
    hooks = UpdateHooks({layer: modules[layer] for layer in chains}, lambda layer: chains[layer][1], inference=True)
    try:
        yield len(hooks.handles)
    finally:
        hooks.remove()
