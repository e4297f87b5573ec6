"""A trainable EigenLoRA adapter on a compressed collection file: the eigenlora family's builder.

The family module (`studio.adapters.eigenlora`) is pure torch; opening a collection file is the
subspace room's job, so the family registry takes the builder from here. Starting points
(``config.init``): "zero" (dW = 0), "mean" (the collection's mean adapter), "nearest" (a stored
adapter: named, nearest to a LoRA file, or the one nearest to the mean).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from studio.adapters.eigenlora import FAMILY, EigenLoraAdapter, EigenLoraConfig
from studio.errors import ConfigError
from studio.subspace.collection import CompressedCollection
from studio.subspace.extract import layer_seed, orthonormal_complement

Components = dict[str, tuple[Tensor, Tensor]]


def components_for(collection: CompressedCollection, config: EigenLoraConfig) -> Components:
    """Per layer the first ``config.k`` stored components plus ``config.augment`` seeded random
    components orthogonal to them: ``{layer: (down (K', in), up (out, K'))}``."""
    components = {}
    for layer, sub in collection.layers.items():
        k = min(config.k or sub.k, sub.k)
        down, up = sub.down_components[:k].double(), sub.up_components[:, :k].double()
        generator = torch.Generator().manual_seed(layer_seed(config.seed, layer))
        extra = min(config.augment, min(down.shape[1], up.shape[0]) - k)
        down = torch.cat([down.T, orthonormal_complement(down.T, extra, generator)], dim=1).T
        up = torch.cat([up, orthonormal_complement(up, extra, generator)], dim=1)
        components[layer] = (down.float().contiguous(), up.float().contiguous())
    return components


def stored_cores(collection: CompressedCollection, name: str) -> dict[str, Tensor]:
    """A stored adapter's cores beta @ alpha (K x K, float64): dW = U core V per layer."""
    return {layer: beta.double() @ alpha.double() for layer, (alpha, beta) in collection.loadings(name).items()}


def mean_cores(collection: CompressedCollection) -> dict[str, Tensor]:
    """The mean adapter in the collection's coordinates: per layer the mean core over the stored
    adapters that have the layer."""
    sums: dict[str, Tensor] = {}
    counts: dict[str, int] = {}
    for name in collection.names:
        for layer, core in stored_cores(collection, name).items():
            sums[layer] = sums[layer] + core if layer in sums else core
            counts[layer] = counts.get(layer, 0) + 1
    return {layer: total / counts[layer] for layer, total in sums.items()}


def _cosine(first: dict[str, Tensor], second: dict[str, Tensor]) -> float:
    inner = sum(float((first[l] * second[l]).sum()) for l in first if l in second)
    norms = (sum(float(c.square().sum()) for c in first.values()) * sum(float(c.square().sum()) for c in second.values())) ** 0.5
    return inner / norms if norms > 0 else 0.0


def nearest_adapter(collection: CompressedCollection, reference: str) -> str:
    """The stored adapter ``reference`` names, the one nearest to the LoRA file ``reference``, or
    (empty reference) the one whose update is nearest to the collection's mean."""
    if reference in collection.names:
        return reference
    if reference:
        if not Path(reference).is_file():
            raise ConfigError(f"init_reference {reference!r} is neither an adapter of {collection.path} nor a LoRA file")
        from studio.subspace.similar import similar

        return similar(reference, collection).rows[0].name
    mean = mean_cores(collection)
    return max(collection.names, key=lambda name: _cosine(stored_cores(collection, name), mean))


def _fit_cores(cores: dict[str, Tensor], components: Components) -> dict[str, Tensor]:
    """Cores cut to the first K' stored components and padded with zeros for augmented ones."""
    fitted = {}
    for layer, core in cores.items():
        if layer not in components:
            continue
        size = components[layer][0].shape[0]
        kept = min(size, core.shape[0])
        padded = core.new_zeros(size, size)
        padded[:kept, :kept] = core[:kept, :kept]
        fitted[layer] = padded
    return fitted


def trainable_adapter(collection: CompressedCollection, config: EigenLoraConfig, name: str = FAMILY) -> EigenLoraAdapter:
    """A fresh trainable adapter on ``collection``'s components, started as ``config.init`` says."""
    components = components_for(collection, config)
    cores = None
    if config.init == "mean":
        cores = _fit_cores(mean_cores(collection), components)
    elif config.init == "nearest":
        cores = _fit_cores(stored_cores(collection, nearest_adapter(collection, config.init_reference)), components)
    return EigenLoraAdapter.new(name, components, config.rank, config.seed, cores)


def build(config: EigenLoraConfig, tree) -> EigenLoraAdapter:
    """The eigenlora family's builder: a trainable adapter on ``config.collection`` for a base's
    module tree (only the loadings train)."""
    if not config.collection:
        raise ConfigError("[adapter] family 'eigenlora' needs collection = <compressed collection file>")
    adapter = trainable_adapter(CompressedCollection.load(config.collection), config)
    unknown = [layer for layer in adapter.layers() if layer not in tree.modules]
    if unknown:
        raise ConfigError(f"collection {config.collection}: {len(unknown)} layer(s) not in base {tree.label}, e.g. {unknown[0]}")
    return adapter
