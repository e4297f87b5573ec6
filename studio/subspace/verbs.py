"""The subspace verbs as plain functions: compress, project, leave-one-out, export.

`compress` works on adapters in memory (Gram matrices of the stacked factors).
`compress_sources` / `compress_files` stream: two passes over the sources, memory bounded by
one adapter plus per-layer statistics, sources sharded across torch.distributed ranks.
Nothing here prints; results are dataclasses the CLI and the app render.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Generator, Iterable, Iterator, Literal, Protocol, Sequence

import torch
from torch import Tensor

from studio.adapters.eigenlora import EigenLoraAdapter, EigenLoraLayer
from studio.adapters.lora import LoraAdapter
from studio.errors import StudioError
from studio.events import Done, Event, Progress, Saved, run_to_end
from studio.subspace.collection import AdapterRecord, CompressedCollection, LayerShape, collection_metadata, info_tensor, layer_tensors, pack_loadings
from studio.subspace.distributed import all_gather_json, barrier, broadcast_json, broadcast_tensor, rank_and_world
from studio.subspace.extract import Directions, LayerSubspace, SubspaceSpec, build_subspace, chunks, directions_batch, layer_seed, reference_extract, warn_clamped
from studio.subspace.project import ErrorParts, error_parts, error_parts_batch, project, total_error
from studio.subspace.spool import SpoolEntry, TensorSpool, write_spools
from studio.subspace.statistics import CollectionStatistics, canonical_layers, check_shape

Factors = dict[str, tuple[Tensor, Tensor]]
Method = Literal["ours", "reference"]


@dataclass
class AdapterReport:
    """One adapter's reconstruction: error over all its layers, sizes before / after."""

    name: str
    rel_error: float
    bytes_in: int
    bytes_out: int
    layer_errors: dict[str, float] = field(default_factory=dict)
    sha256: str = ""


@dataclass
class CompressResult:
    """What `compress` did: per adapter errors and sizes, K and explained energy per layer."""

    adapters: list[AdapterReport]
    bytes_in: int
    bytes_out: int
    layers: dict[str, LayerSubspace]
    collection: CompressedCollection
    path: Path | None = None

    @property
    def k(self) -> dict[str, int]:
        return {name: sub.k for name, sub in self.layers.items()}

    @property
    def explained(self) -> dict[str, tuple[list[float], list[float]]]:
        """Cumulative explained-energy curves per layer: (down, up)."""
        return {name: (sub.down_explained.tolist(), sub.up_explained.tolist()) for name, sub in self.layers.items()}

    def as_json(self) -> dict:
        ks = list(self.k.values())
        return {
            "adapters": [{"name": a.name, "rel_error": a.rel_error, "bytes_in": a.bytes_in, "bytes_out": a.bytes_out} for a in self.adapters],
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "ratio": self.bytes_out / self.bytes_in if self.bytes_in else None,
            "k": self.k,
            "k_summary": {"min": min(ks, default=0), "max": max(ks, default=0), "mean": sum(ks) / max(len(ks), 1)},
            "clamped_layers": [name for name, sub in self.layers.items() if sub.clamped],
            "path": str(self.path) if self.path else None,
        }


@dataclass
class ProjectResult:
    """An adapter projected onto a collection's components, and how much of it survives."""

    name: str
    rel_error: float
    layer_errors: dict[str, float]
    uncovered_layers: list[str]
    adapter: EigenLoraAdapter

    def as_json(self) -> dict:
        worst = sorted(self.layer_errors.items(), key=lambda item: -item[1])[:5]
        return {"name": self.name, "rel_error": self.rel_error, "uncovered_layers": self.uncovered_layers, "worst_layers": dict(worst)}


# ---------------------------------------------------------------- factors and reconstruction


def adapter_factors(adapter: LoraAdapter, canonicalise: bool = True, device: torch.device | str = "cpu") -> Factors:
    """``{layer: (A, B)}`` with the scale folded in: canonical (ours) or as stored (reference)."""
    return collection_factors([adapter], canonicalise, device)[0]


def collection_factors(adapters: Sequence[LoraAdapter], canonicalise: bool = True, device: torch.device | str = "cpu") -> list[Factors]:
    """`adapter_factors` of every adapter; canonical forms of all equal-shape layers of all
    adapters are computed in batched calls (`canonical_layers`)."""
    if not canonicalise:
        return [{name: tuple(t.to(device) for t in layer.factors()) for name, layer in adapter.lora_layers.items()} for adapter in adapters]
    keys = [(i, name) for i, adapter in enumerate(adapters) for name in adapter.lora_layers]
    canonicals = canonical_layers([adapters[i].lora_layers[name] for i, name in keys], device)
    result: list[Factors] = [{} for _ in adapters]
    for (i, name), factors in zip(keys, canonicals):
        result[i][name] = factors
    return result


def fit_subspaces(collection: Sequence[Factors], spec: SubspaceSpec, method: Method = "ours") -> dict[str, LayerSubspace]:
    """Per-layer components of a collection in memory; a layer uses the adapters that have it.

    Ours stacks the layers whose stacked factors have equal shapes and eigendecomposes their
    Gram matrices in one batched call (`directions_batch`)."""
    names = sorted({layer for factors in collection for layer in factors})
    members = {name: [factors[name] for factors in collection if name in factors] for name in names}
    if method == "reference":
        if spec.k is None:
            raise ValueError("the reference procedure takes a fixed k, not an energy threshold")
        return {name: reference_extract([d for d, _ in pairs], [u for _, u in pairs], spec.k) for name, pairs in members.items()}
    down = _batched_directions({name: [d.reshape(d.shape[0], -1) for d, _ in pairs] for name, pairs in members.items()})
    up = _batched_directions({name: [u.reshape(u.shape[0], -1).T for _, u in pairs] for name, pairs in members.items()})
    subspaces = {
        name: build_subspace(down[name], up[name], spec, layer_seed(spec.seed, name), down[name].vectors.shape[0], up[name].vectors.shape[0])
        for name in names
    }
    warn_clamped(subspaces, spec.augment)
    return subspaces


def _batched_directions(rows: dict[str, list[Tensor]]) -> dict[str, Directions]:
    """Directions of each layer's stacked rows; layers of equal stacked shape share one eigh."""
    groups: dict[tuple[int, int], list[str]] = {}
    for name, parts in rows.items():
        groups.setdefault((sum(p.shape[0] for p in parts), parts[0].shape[1]), []).append(name)
    result = {}
    for (count, dim), names in groups.items():
        for part in chunks(len(names), count * max(count, dim)):
            batch = [names[j] for j in part]
            stacked = torch.stack([torch.cat(rows[name]) for name in batch])
            result.update(zip(batch, directions_batch(stacked)))
    return result


@dataclass
class Reconstruction:
    loadings: dict[str, tuple[Tensor, Tensor]]
    parts: dict[str, ErrorParts]
    uncovered: list[str]

    @property
    def total(self) -> ErrorParts:
        return total_error(list(self.parts.values()))


def reconstruct(factors: Factors, layers: dict[str, LayerSubspace]) -> Reconstruction:
    """Loadings and error parts of one adapter; a layer without components counts as lost."""
    return reconstruct_all([factors], layers)[0]


def reconstruct_all(collection: Sequence[Factors], layers: dict[str, LayerSubspace]) -> list[Reconstruction]:
    """`reconstruct` of every adapter: per layer, the adapters of one rank are projected together
    (batched matmuls); loadings come back on the CPU (one copy per layer and rank), error parts
    are read from the device once for everything."""
    loadings: list[dict] = [{} for _ in collection]
    pending: list[tuple[list[tuple[int, str]], Tensor, Tensor]] = []  # (adapter, layer) keys, residuals, totals
    for name, sub in layers.items():
        groups: dict[tuple, list[int]] = {}
        for i, factors in enumerate(collection):
            if name in factors:
                groups.setdefault(tuple(factors[name][0].shape), []).append(i)
        for members in groups.values():
            downs = torch.stack([collection[i][name][0] for i in members])
            ups = torch.stack([collection[i][name][1] for i in members])
            down_components, up_components = sub.down_components.to(downs.device), sub.up_components.to(downs.device)
            alphas, betas = project(downs, ups, down_components, up_components)
            alphas, betas = alphas.cpu(), betas.cpu()
            for j, i in enumerate(members):
                loadings[i][name] = (alphas[j], betas[j])
            pending.append(([(i, name) for i in members], *error_parts_batch(downs, ups, down_components, up_components)))
    values = torch.cat([torch.stack([r, t], dim=1).cpu() for _, r, t in pending]).tolist() if pending else []
    found = dict(zip([key for keys, _, _ in pending for key in keys], values))
    result = []
    for i, factors in enumerate(collection):
        parts, uncovered = {}, []
        for name, (down, up) in factors.items():
            if (i, name) in found:
                parts[name] = ErrorParts(*found[(i, name)])
            else:
                parts[name] = error_parts(down, up, down.new_zeros(0, down.shape[1]), up.new_zeros(up.shape[0], 0))
                uncovered.append(name)
        result.append(Reconstruction(loadings[i], parts, uncovered))
    return result


def factor_bytes(adapter: LoraAdapter) -> int:
    """Bytes of the adapter's factors as stored (dtype kept), plus 4 per alpha."""
    return sum(l.down.nbytes + l.up.nbytes + 4 for l in adapter.lora_layers.values())


def content_sha256(adapter: LoraAdapter) -> str:
    """sha256 of the factors' bytes, for adapters that do not come from a file."""
    digest = hashlib.sha256()
    for name in sorted(adapter.lora_layers):
        layer = adapter.lora_layers[name]
        digest.update(name.encode())
        for tensor in (layer.down, layer.up):
            digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
        digest.update(repr(layer.alpha).encode())
    return digest.hexdigest()


def _record(adapter: LoraAdapter, sha256: str, error: float, bytes_in: int) -> AdapterRecord:
    return AdapterRecord(
        name=adapter.name, sha256=sha256, rel_error=error,
        ranks={n: l.rank for n, l in adapter.lora_layers.items()}, alphas={n: float(l.alpha) for n, l in adapter.lora_layers.items()},
        metadata=dict(adapter.metadata), source_format=str(adapter.source_format), base_arch=str(getattr(adapter, "base_arch", "")),
        bytes_in=bytes_in,
    )


def _check_names(names: list[str], what: str = "adapters") -> None:
    seen, doubles = set(), set()
    for name in names:
        (doubles if name in seen else seen).add(name)
    if doubles:
        raise StudioError(f"{what} must have unique names; repeated: {sorted(set(doubles))[:5]} (rename the files)")


def _check_bases(arches: Iterable[str]) -> str:
    """The one base architecture the adapters share ("" if unknown); refuse a mix."""
    found = sorted({a for a in arches if a})
    if len(found) > 1:
        raise StudioError(f"the adapters are for different base models ({', '.join(found)}); compress each base separately")
    return found[0] if found else ""


# ---------------------------------------------------------------- in memory


def compress(
    adapters: list[LoraAdapter],
    k: int | None = None,
    energy: float | None = None,
    augment: int = 0,
    base_id: str = "",
    seed: int = 0,
    output: str | Path | None = None,
    device: torch.device | str = "cpu",
) -> CompressResult:
    """Compress adapters held in memory into shared components + per-adapter loadings.

    Exactly one of ``k`` (components per layer) or ``energy`` (explained fraction) is given.
    With ``output`` the collection is also written there (atomically).
    """
    spec = SubspaceSpec(k=k, energy=energy, augment=augment, seed=seed)
    if not adapters:
        raise StudioError("compress needs at least one adapter")
    _check_names([a.name for a in adapters])
    base_id = base_id or _check_bases(getattr(a, "base_arch", "") for a in adapters)
    shapes: dict[str, LayerShape] = {}
    for adapter in adapters:
        for name, layer in adapter.lora_layers.items():
            check_shape(shapes, name, LayerShape.of(layer), adapter.name)
    factors = collection_factors(adapters, True, device)
    layers = fit_subspaces(factors, spec)
    records, loadings, reports = [], [], []
    for adapter, rebuilt in zip(adapters, reconstruct_all(factors, layers)):
        flat = pack_loadings(rebuilt.loadings, list(layers))
        record = _record(adapter, content_sha256(adapter), rebuilt.total.relative, factor_bytes(adapter))
        records.append(record)
        loadings.append(flat)
        reports.append(AdapterReport(adapter.name, record.rel_error, record.bytes_in, flat.nbytes, {n: p.relative for n, p in rebuilt.parts.items()}, record.sha256))
    layers_cpu = {name: _to_cpu(sub) for name, sub in layers.items()}
    collection = CompressedCollection(layers_cpu, {n: shapes[n] for n in layers}, [r.summary() for r in records], base_id, _spec_json(spec), None, records, loadings)
    path = collection.save(output) if output is not None else None
    bytes_out = path.stat().st_size if path else sum(t.nbytes for s in layers_cpu.values() for t in layer_tensors(0, s).values()) + sum(f.nbytes for f in loadings)
    return CompressResult(reports, sum(r.bytes_in for r in reports), bytes_out, layers_cpu, collection, path)


def _to_cpu(sub: LayerSubspace) -> LayerSubspace:
    return LayerSubspace(sub.down_components.cpu(), sub.up_components.cpu(), sub.down_explained.cpu(), sub.up_explained.cpu(), sub.requested_k, sub.principal_k, sub.augment)


def _spec_json(spec: SubspaceSpec) -> dict:
    return {"k": spec.k, "energy": spec.energy, "augment": spec.augment, "seed": spec.seed}


def leave_one_out(
    adapters: list[LoraAdapter], k: int | None = None, energy: float | None = None, augment: int = 0, seed: int = 0,
    method: Method = "ours", device: torch.device | str = "cpu",
) -> list[float]:
    """Error of each adapter projected onto the subspace of all the others (generalisation)."""
    spec = SubspaceSpec(k=k, energy=energy, augment=augment, seed=seed)
    collection = collection_factors(adapters, method == "ours", device)
    errors = []
    for i, factors in enumerate(collection):
        others = collection[:i] + collection[i + 1 :]
        if not others:
            errors.append(1.0)
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            layers = fit_subspaces(others, spec, method)
        errors.append(reconstruct(factors, layers).total.relative)
    return errors


def reconstruction_errors(adapters: list[LoraAdapter], k: int, method: Method = "ours", seed: int = 0, device: torch.device | str = "cpu") -> list[float]:
    """Error of every adapter reconstructed from the subspace of the whole collection at ``k``."""
    spec = SubspaceSpec(k=k, seed=seed)
    collection = collection_factors(adapters, method == "ours", device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layers = fit_subspaces(collection, spec, method)
    return [rebuilt.total.relative for rebuilt in reconstruct_all(collection, layers)]


def project_adapter(collection: CompressedCollection, adapter: LoraAdapter, device: torch.device | str = "cpu") -> ProjectResult:
    """Project an (unseen) adapter onto a collection's components; report its error.

    Layers the collection has no components for are lost: they count fully in the error and
    are listed in ``uncovered_layers``. A layer whose shape differs is refused.
    """
    for name, layer in adapter.lora_layers.items():
        if name in collection.shapes and collection.shapes[name] != LayerShape.of(layer):
            raise StudioError(f"adapter {adapter.name!r}: layer {name!r} does not have the collection's shape {collection.shapes[name]}")
    rebuilt = reconstruct(adapter_factors(adapter, True, device), collection.layers)
    modules = {
        name: EigenLoraLayer(collection.layers[name].down_components, collection.layers[name].up_components, alpha.cpu(), beta.cpu())
        for name, (alpha, beta) in rebuilt.loadings.items()
    }
    shapes = {name: collection.shapes[name].weight_shapes(adapter.lora_layers[name].rank) for name in modules}
    projected = EigenLoraAdapter(adapter.name, modules, adapter.metadata, shapes)
    return ProjectResult(adapter.name, rebuilt.total.relative, {n: p.relative for n, p in rebuilt.parts.items()}, rebuilt.uncovered, projected)


# ---------------------------------------------------------------- streaming


class AdapterSource(Protocol):
    """Something that can load one adapter on demand (twice: once per pass)."""

    name: str

    def load(self) -> LoraAdapter: ...

    def sha256(self) -> str: ...

    def nbytes(self) -> int: ...


@dataclass
class FileSource:
    """An adapter file, read with ``loader`` (default: `studio.formats.load_adapter`)."""

    path: Path
    loader: Callable[[Path], LoraAdapter] | None = None

    @property
    def name(self) -> str:
        return Path(self.path).stem

    def load(self) -> LoraAdapter:
        if self.loader is not None:
            return self.loader(Path(self.path))
        from studio.formats import load_adapter

        return load_adapter(self.path)

    def sha256(self) -> str:
        digest = hashlib.sha256()
        with Path(self.path).open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()

    def nbytes(self) -> int:
        return Path(self.path).stat().st_size


@dataclass
class HeldSource:
    """An adapter already in memory, as an `AdapterSource` (the app's collection)."""

    adapter: LoraAdapter

    @property
    def name(self) -> str:
        return self.adapter.name

    def load(self) -> LoraAdapter:
        return self.adapter

    def sha256(self) -> str:
        return content_sha256(self.adapter)

    def nbytes(self) -> int:
        return factor_bytes(self.adapter)


def adapter_files(paths: Iterable[str | Path]) -> list[Path]:
    """Files given directly, plus the adapter files directly inside given folders (as `studio inspect` sees them)."""
    from studio.collection import expand_paths

    return expand_paths(list(paths))


def _shard(count: int, rank: int, world: int) -> range:
    return range(count * rank // world, count * (rank + 1) // world)


def _broadcast_subspaces(layers: dict[str, LayerSubspace] | None, group) -> dict[str, LayerSubspace]:
    """Rank 0's components on every rank, so all ranks project onto identical tensors."""
    rank, _ = rank_and_world(group)
    description = broadcast_json(
        {n: [s.k, s.requested_k, s.principal_k, s.augment, list(s.down_components.shape), list(s.up_components.shape), s.down_explained.numel(), s.up_explained.numel()] for n, s in layers.items()}
        if rank == 0 else None,
        group,
    )
    result = {}
    for name, (k, requested, principal, augment, down_shape, up_shape, n_down, n_up) in description.items():
        mine = layers[name] if rank == 0 else None
        tensors = [mine.down_components, mine.up_components, mine.down_explained, mine.up_explained] if mine else [torch.zeros(down_shape), torch.zeros(up_shape), torch.zeros(n_down), torch.zeros(n_up)]
        tensors = [broadcast_tensor(t.cpu(), group) for t in tensors]
        result[name] = LayerSubspace(*tensors, requested_k=requested, principal_k=principal, augment=augment)
    return result


def compress_sources(sources: Sequence[AdapterSource], output: str | Path, **options: Any) -> CompressResult:
    """`compress_events` drained: the `CompressResult` (same options: k or energy, augment, ...)."""
    return run_to_end(compress_events(sources, output, **options))


def compress_events(
    sources: Sequence[AdapterSource],
    output: str | Path,
    k: int | None = None,
    energy: float | None = None,
    augment: int = 0,
    base_id: str = "",
    seed: int = 0,
    device: torch.device | str = "cpu",
    group=None,
    statistics_dtype: torch.dtype = torch.float64,
) -> Iterator[Event]:
    """Streaming compression of ``sources`` into the file ``output``, as events.

    Yields `Progress` per adapter of this rank's shard in each pass (stages "statistics" and
    "projection"), `Saved` for the file (rank 0) and `Done` with the `CompressResult`.
    Pass 1 adds each adapter's canonical factors to per-layer sums (then drops it); the sums are
    all-reduced across ranks and rank 0's components are broadcast. Pass 2 projects each adapter
    and spools its loadings to disk; rank 0 writes the file from all ranks' spools. Every rank
    handles a contiguous shard of ``sources`` and returns the same result. The per-layer sums take
    sum(in^2 + out^2) numbers of ``statistics_dtype`` (SDXL's 560 attention projections: 15 GiB in
    float64, 7.5 GiB in float32), whatever the number of adapters.
    """
    spec = SubspaceSpec(k=k, energy=energy, augment=augment, seed=seed)
    rank, world = rank_and_world(group)
    output = Path(output)
    if not sources:
        raise StudioError("compress needs at least one adapter")
    _check_names([s.name for s in sources])
    shard = _shard(len(sources), rank, world)
    statistics = CollectionStatistics(device, statistics_dtype)
    arches = []
    for step, index in enumerate(shard, start=1):
        adapter = sources[index].load()
        arches.append(str(getattr(adapter, "base_arch", "")))
        statistics.add(adapter)
        del adapter
        yield Progress(step, len(shard), stage="statistics")
    base_id = base_id or _check_bases(a for rank_arches in all_gather_json(arches, group) for a in rank_arches)
    statistics.all_reduce(group)
    layers = statistics.subspaces(spec) if rank == 0 else None
    if rank == 0:
        warn_clamped(layers, spec.augment)
    layers = _broadcast_subspaces(layers, group)
    shapes = dict(statistics.shapes)
    del statistics
    parts, reports = yield from _second_pass(sources, shard, layers, output, rank, device)
    everything = all_gather_json(parts, group)
    reports = [AdapterReport(**r) for rank_reports in all_gather_json(reports, group) for r in rank_reports]
    if rank == 0:
        spool_parts = [(Path(p["path"]), [SpoolEntry.from_json(e) for e in p["entries"]], p["size"]) for rank_parts in everything for p in rank_parts]
        summaries = [{"name": r.name, "sha256": r.sha256, "rel_error": r.rel_error} for r in reports]
        write_spools(output, spool_parts, collection_metadata(base_id, _spec_json(spec), layers, shapes, summaries))
    barrier(group)
    for part in parts:
        Path(part["path"]).unlink(missing_ok=True)
    if rank == 0:
        yield Saved(output, "collection")
    collection = CompressedCollection.load(output)
    yield Done(CompressResult(reports, sum(r.bytes_in for r in reports), output.stat().st_size, collection.layers, collection, output))


def _second_pass(
    sources: Sequence[AdapterSource], shard: range, layers: dict[str, LayerSubspace], output: Path, rank: int, device
) -> Generator[Progress, None, tuple[list[dict], list[dict]]]:
    """Project this rank's shard; spool loadings (and, on rank 0, the components first).
    Yields `Progress` per adapter; returns the spool descriptions and the reports."""
    spools = []
    if rank == 0:
        components = TensorSpool(output.parent / f".{output.name}.components.spool")
        for i, sub in enumerate(layers.values()):
            for key, tensor in layer_tensors(i, sub).items():
                components.add(key, tensor)
        components.close()
        spools.append(components)
    loadings_spool = TensorSpool(output.parent / f".{output.name}.rank{rank}.spool")
    spools.append(loadings_spool)
    order, reports = list(layers), []
    for step, index in enumerate(shard, start=1):
        source = sources[index]
        adapter = source.load()
        rebuilt = reconstruct(adapter_factors(adapter, True, device), layers)
        flat = pack_loadings(rebuilt.loadings, order)
        record = _record(adapter, source.sha256(), rebuilt.total.relative, source.nbytes())
        record.name = source.name
        loadings_spool.add(f"adapter.{index}.loadings", flat)
        loadings_spool.add(f"adapter.{index}.info", info_tensor(record, order))
        errors = {n: p.relative for n, p in rebuilt.parts.items()}
        reports.append({"name": record.name, "rel_error": record.rel_error, "bytes_in": record.bytes_in, "bytes_out": flat.nbytes, "layer_errors": errors, "sha256": record.sha256})
        del adapter, rebuilt
        yield Progress(step, len(shard), stage="projection")
    loadings_spool.close()
    return [{"path": str(s.path), "entries": [e.as_json() for e in s.entries], "size": s.size} for s in spools], reports


def compress_files(
    paths: Iterable[str | Path], output: str | Path, loader: Callable[[Path], LoraAdapter] | None = None, **options: Any
) -> CompressResult:
    """`compress_sources` over LoRA files (folders expand to their ``*.safetensors``)."""
    return compress_sources(file_sources(paths, loader), output, **options)


def file_sources(paths: Iterable[str | Path], loader: Callable[[Path], LoraAdapter] | None = None) -> list[FileSource]:
    """One `FileSource` per LoRA file (folders expand to their ``*.safetensors``), for `compress_events`."""
    return [FileSource(path, loader) for path in adapter_files(paths)]
