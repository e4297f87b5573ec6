"""Compress: THE implementation every front end runs (`studio compress`, the app, recipes).

`compress_events(sources, output, ...)` reads each source once. Pass 1 brings every adapter to
canonical form (batched on the device), adds it to the per-layer statistics (`statistics.py`:
exact Gram route or summed covariances) and keeps its canonical factors (`store.py`: memory up to
a budget, then a spool file). The components are fitted once; pass 2 works from the kept factors
(`evaluate.py`: loadings, errors, leave-one-out and baselines) and spools the loadings. The file
is then written atomically from the spools, and the collection report (`report.py`) computed.

Adapters in memory are just another source (`HeldSource`). Under torch.distributed each rank
handles a contiguous shard of the sources; covariances are all-reduced, rank 0's components are
broadcast, and rank 0 writes the file. Nothing here prints; events and results carry everything.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Generator, Iterable, Iterator, Sequence

import torch
from torch import Tensor

from studio.adapters.lora import LoraAdapter
from studio.errors import StudioError
from studio.events import Done, Event, Message, Progress, Saved, run_to_end
from studio.subspace.collection import AdapterRecord, CompressedCollection, LayerShape, collection_metadata, info_tensor, is_collection_file, layer_tensors, pack_loadings
from studio.subspace.distributed import all_gather_json, all_reduce_sum, barrier, broadcast_json, broadcast_tensor, rank_and_world
from studio.subspace.evaluate import SKETCH_SIDE, AdapterNumbers, LayerPlan, blocks, directions_needed, evaluate, layer_plans, loo_plan
from studio.subspace.extract import LayerSubspace, SubspaceSpec, warn_clamped
from studio.subspace.report import AdapterQuality, CollectionReport, build_report, mean_baseline, relative, similar_pairs, svd_baseline
from studio.subspace.sources import AdapterSource, Digests, check_bases, check_names, file_sources, prefetched
from studio.subspace.spool import SpoolEntry, TensorSpool, write_spools
from studio.subspace.statistics import CollectionStatistics, FittedLayer, canonical_layers, check_shape
from studio.subspace.store import DEFAULT_BUDGET, FactorStore, device_budget

STARTED = time.time()  # temporary files next to an output older than this process are left-overs of a kill
# Intra-op threads of the math on a CPU device. The work is thousands of small eighs / matmuls
# (r x r, M x M, K x K): one thread each runs them at full speed, while several threads contend
# (measured on 2 busy cores: a batch of 256 eighs of 96 x 96 in 0.4-0.6 s on one thread, 7-35 s
# on two). File reading and parsing run on the loader thread meanwhile (`sources.prefetched`).
# On a GPU the host's torch work (loader threads' copies, the report's small float64 sums) runs on
# one intra-op thread too: every loader thread calling a parallel op gets a thread team of its own,
# and 4 loaders x 16 threads beside the main thread made a 20-file SDXL compress 2 s slower (H200 host).
CPU_THREADS = 1


@dataclass
class AdapterReport:
    """One adapter's reconstruction: error over all its layers, sizes before / after, and the
    collection report's numbers for it (None where not computed)."""

    name: str
    rel_error: float
    bytes_in: int
    bytes_out: int
    layer_errors: dict[str, float] = field(default_factory=dict)
    sha256: str = ""
    loo_error: float | None = None
    mean_error: float | None = None
    random_error: float | None = None
    svd_error: float | None = None


@dataclass
class CompressResult:
    """What a compress did: per adapter errors and sizes, K and explained energy per layer, the
    collection file and its report (verdict, baselines, near-duplicates)."""

    adapters: list[AdapterReport]
    bytes_in: int
    bytes_out: int
    layers: dict[str, LayerSubspace]
    collection: CompressedCollection
    path: Path | None = None
    report: CollectionReport | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def k(self) -> dict[str, int]:
        return {name: sub.k for name, sub in self.layers.items()}

    @property
    def explained(self) -> dict[str, tuple[list[float], list[float]]]:
        """Cumulative explained-energy curves per layer: (down, up)."""
        return {name: (sub.down_explained.tolist(), sub.up_explained.tolist()) for name, sub in self.layers.items()}

    def explained_mean(self) -> dict[str, list[float]]:
        """Mean over layers of the cumulative explained energy at 1, 2, ... components, per side.

        A layer's curve ends where its directions end (at 1.0); it counts with that final value
        beyond, so the mean is cumulative and non-decreasing (averaging only the layers whose
        curve is still running made the app's curve dip where short curves dropped out)."""
        result = {}
        for side in ("down", "up"):
            curves = [c for c in (getattr(sub, f"{side}_explained") for sub in self.layers.values()) if c.numel()]
            longest = max((c.numel() for c in curves), default=0)
            padded = torch.stack([torch.cat([c.double(), c[-1:].double().expand(longest - c.numel())]) for c in curves]) if curves else None
            result[side] = (padded.sum(0) / len(curves)).tolist() if padded is not None else []
        return result

    def as_json(self) -> dict:
        ks = list(self.k.values())
        return {
            "adapters": [{f.name: getattr(a, f.name) for f in fields(a) if f.name != "layer_errors"} for a in self.adapters],
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "ratio": self.bytes_out / self.bytes_in if self.bytes_in else None,
            "k": self.k,
            "k_summary": {"min": min(ks, default=0), "max": max(ks, default=0), "mean": sum(ks) / max(len(ks), 1)},
            "clamped_layers": [name for name, sub in self.layers.items() if sub.clamped],
            "explained_mean": self.explained_mean(),
            "report": self.report.as_json() if self.report else None,
            "notes": list(self.notes),
            "path": str(self.path) if self.path else None,
        }


# ---------------------------------------------------------------- sources and the output


def _same_file(path: Path, output: Path) -> bool:
    """Whether writing ``output`` would replace ``path`` (same name, symlink or hard link)."""
    if output.exists() and path.exists():
        return os.path.samefile(path, output)
    return path.resolve() == output.resolve()


def usable_sources(sources: Sequence[AdapterSource], output: Path) -> tuple[list[AdapterSource], list[str]]:
    """The sources to compress and one message per skipped file. A compressed collection among the
    files (a previous output in the folder being compressed) is skipped; an output that names an
    input LoRA is refused before anything is written."""
    kept, skipped = [], []
    for source in sources:
        path = getattr(source, "path", None)
        if path is not None and Path(path).is_file() and is_collection_file(path):
            skipped.append(f"{path}: a compressed collection, not a LoRA; skipped")
            continue
        if path is not None and _same_file(Path(path), output):
            raise StudioError(f"{output}: the output would replace the input LoRA {path}; choose another output file (nothing was written)")
        kept.append(source)
    return kept, skipped


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def remove_stale(output: Path) -> list[Path]:
    """Remove what a killed compress left next to ``output``: spool folders of processes that no
    longer run (``.{name}.{pid}.*.spool``) and atomic-write temporaries older than this process."""
    removed = []
    for path in output.parent.glob(f".{output.name}.*"):
        parts = path.name[len(output.name) + 2 :].split(".")
        stale = False
        if path.name.endswith(".spool"):
            stale = not (parts[0].isdigit() and _alive(int(parts[0]))) or int(parts[0]) == os.getpid() and path.stat().st_mtime < STARTED
        elif path.name.endswith(".tmp"):
            stale = path.stat().st_mtime < STARTED
        if stale:
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
            removed.append(path)
    return removed


# ---------------------------------------------------------------- compress


def compress_sources(sources: Sequence[AdapterSource], output: str | Path, **options: Any) -> CompressResult:
    """`compress_events` drained: the `CompressResult`. ``options``: the `SubspaceSpec` fields (k or energy,
    augment, seed) and the `CompressSettings` fields (base_id, device, group, statistics_dtype, held_bytes, device_bytes)."""
    spec_names = {item.name for item in fields(SubspaceSpec)}
    spec = SubspaceSpec(**{name: value for name, value in options.items() if name in spec_names})
    settings = CompressSettings(**{name: value for name, value in options.items() if name not in spec_names})
    return run_to_end(compress_events(sources, output, spec, settings))


def compress_files(
    paths: Iterable[str | Path], output: str | Path, loader: Callable[[Path], LoraAdapter] | None = None, **options: Any
) -> CompressResult:
    """`compress_sources` over LoRA files (folders expand to their ``*.safetensors``)."""
    return compress_sources(file_sources(paths, loader), output, **options)


@dataclass(frozen=True)
class CompressSettings:
    """Where and how a compress runs, not what it computes: ``base_id`` recorded in the file, the
    ``device`` of the math, the torch.distributed ``group`` sharding the sources (None: one process),
    the precision of summed covariances and the bytes of canonical factors kept in memory between
    the passes (the rest goes to a spool file)."""

    base_id: str = ""
    device: torch.device | str = "cpu"
    group: Any = None
    statistics_dtype: torch.dtype = torch.float64
    held_bytes: int = DEFAULT_BUDGET
    device_bytes: int | None = None  # factors left on a GPU between the passes (None: `store.device_budget`)


def compress_events(sources: Sequence[AdapterSource], output: str | Path, spec: SubspaceSpec,
                    settings: CompressSettings = CompressSettings()) -> Iterator[Event]:
    """Compress ``sources`` into the collection file ``output``, as events.

    ``spec``: exactly one of k (components per layer) or energy (explained fraction), augment P
    seeded random components per layer. Yields `Message` per skipped file, `Progress` per adapter
    of this rank's shard in each pass (stages "statistics", "projection"), `Saved` for the file
    (rank 0) and `Done` with the `CompressResult`. Temporary files live in one folder next to the
    output, removed at the end (and, if a kill left one, by the next run).
    """
    output = Path(output)
    sources, skipped = usable_sources(sources, output)
    for text in skipped:
        yield Message(text, "warning")
    if not sources:
        raise StudioError("compress needs at least one adapter")
    check_names([s.name for s in sources])
    output.parent.mkdir(parents=True, exist_ok=True)
    rank, world = rank_and_world(settings.group)
    if rank == 0:
        remove_stale(output)
    work = Path(tempfile.mkdtemp(prefix=f".{output.name}.{os.getpid()}.", suffix=".spool", dir=output.parent))
    device, threads = torch.device(settings.device), torch.get_num_threads()
    shard = _shard(len(sources), rank, world)
    store = FactorStore(work, settings.held_bytes, device_budget(device) if settings.device_bytes is None else settings.device_bytes)
    run = _Run(sources, spec, device, settings.group, store, shard=shard, digests=Digests(sources, shard))
    statistics = CollectionStatistics(len(sources), device, settings.statistics_dtype, gram=world == 1)
    torch.set_num_threads(CPU_THREADS)
    try:
        result = yield from _compress(run, statistics, output, settings.base_id, work)
    finally:
        run.digests.close()
        torch.set_num_threads(threads)
        shutil.rmtree(work, ignore_errors=True)
    yield Done(result)


@dataclass
class _Run:
    """State shared by the passes of one compress on this rank."""

    sources: Sequence[AdapterSource]
    spec: SubspaceSpec
    device: torch.device
    group: Any
    store: FactorStore
    records: dict[int, AdapterRecord] = field(default_factory=dict)
    shard: range = range(0)
    digests: Digests | None = None  # sha256 of the shard's sources, hashed beside the passes


def _compress(run: _Run, statistics: CollectionStatistics, output: Path, base_id: str, work: Path) -> Generator[Event, None, CompressResult]:
    """Both passes, the report and the file (rank 0); every rank returns the same result."""
    sources, spec, device, group = run.sources, run.spec, run.device, run.group
    rank, _ = rank_and_world(group)
    yield from _first_pass(run, statistics)
    base_id = base_id or check_bases(a for rank_arches in all_gather_json([r.base_arch for r in run.records.values()], group) for a in rank_arches)
    statistics.all_reduce(group)
    fitted = statistics.fit(spec, directions_needed(spec))
    if rank == 0:
        warn_clamped({n: f.subspace for n, f in fitted.items()}, spec.augment)
    _broadcast_subspaces(fitted, group)
    shapes = dict(statistics.shapes)
    loo = loo_plan(list(range(len(sources))), list(fitted))
    plans = layer_plans(fitted, loo.layers, spec.seed, device)
    spools, numbers = yield from _second_pass(run, statistics, fitted, plans, loo.adapters, work, rank)
    run.store.close()
    statistics.release()
    gathered = _gather_numbers(run, numbers, plans, group)
    report = _report(gathered, fitted, plans, loo, len(sources))
    reports = _adapter_reports(gathered, report)
    everything = all_gather_json(spools, group)
    if rank == 0:
        spool_parts = [(Path(p["path"]), [SpoolEntry.from_json(e) for e in p["entries"]], p["size"]) for rank_parts in everything for p in rank_parts]
        summaries = [{"name": r.name, "sha256": r.sha256, "rel_error": r.rel_error} for r in reports]
        layers = {n: f.subspace for n, f in fitted.items()}
        write_spools(output, spool_parts, collection_metadata(base_id, spec.as_json(), layers, shapes, summaries, report.summary()))
        yield Saved(output, "collection")
    barrier(group)
    collection = CompressedCollection.load(output)
    notes = [report.loo_note] + ([] if report.products_exact else ["update inner products (duplicates, mean baseline) are tensor-sketch estimates on covariance-route layers"])
    return CompressResult(reports, sum(r.bytes_in for r in reports), output.stat().st_size, collection.layers, collection, output, report, notes)


def _shard(count: int, rank: int, world: int) -> range:
    return range(count * rank // world, count * (rank + 1) // world)


def _record(adapter: LoraAdapter, name: str, sha256: str, nbytes: int) -> AdapterRecord:
    return AdapterRecord(
        name=name, sha256=sha256, ranks={n: l.rank for n, l in adapter.lora_layers.items()},
        alphas={n: float(l.alpha) for n, l in adapter.lora_layers.items()}, metadata=dict(adapter.metadata),
        source_format=str(adapter.source_format), base_arch=str(getattr(adapter, "base_arch", "")), bytes_in=nbytes,
    )


def _first_pass(run: _Run, statistics: CollectionStatistics) -> Generator[Progress, None, None]:
    """Read each source of this rank's shard once: canonical factors into the statistics and the store."""
    for step, loaded in enumerate(prefetched(run.sources, run.shard), start=1):
        adapter, name = loaded.adapter, run.sources[loaded.index].name
        for layer_name, layer in adapter.lora_layers.items():
            check_shape(statistics.shapes, layer_name, LayerShape.of(layer), name)
        canonicals = dict(zip(adapter.lora_layers, canonical_layers(list(adapter.lora_layers.values()), run.device)))
        run.store.add(statistics.add(loaded.index, canonicals))  # gram-route layers stay in the statistics
        run.records[loaded.index] = _record(adapter, name, "", loaded.nbytes)  # sha256: `Digests`, before it is written
        del adapter, canonicals, loaded
        yield Progress(step, len(run.shard), stage="statistics")


def _broadcast_subspaces(fitted: dict[str, FittedLayer], group) -> None:
    """Rank 0's components on every rank, so all ranks project onto identical tensors (every rank
    fits the same all-reduced sums; this removes rounding differences between devices)."""
    if rank_and_world(group)[1] == 1:
        return
    names = broadcast_json(sorted(fitted), group)
    for name in names:
        sub = fitted[name].subspace
        sub.down_components = broadcast_tensor(sub.down_components.contiguous(), group)
        sub.up_components = broadcast_tensor(sub.up_components.contiguous(), group)


def _second_pass(
    run: _Run, statistics: CollectionStatistics, fitted: dict[str, FittedLayer], plans: dict[str, LayerPlan], loo_adapters: set[int], work: Path, rank: int
) -> Generator[Progress, None, tuple[list[dict], list[AdapterNumbers]]]:
    """Evaluate this rank's adapters in blocks, from the factors the statistics kept (gram-route
    layers) and the store (the others); spool loadings and info (and, on rank 0, the components
    first). Returns the spool descriptions and the numbers."""
    spools = []
    if rank == 0:
        components = TensorSpool(work / f"components.rank{rank}")
        for i, layer in enumerate(fitted.values()):
            for key, tensor in layer_tensors(i, layer.subspace).items():
                components.add(key, tensor)
        components.close()
        spools.append(components)
    loadings_spool = TensorSpool(work / f"loadings.rank{rank}")
    spools.append(loadings_spool)
    order, found, step = list(plans), [], 0
    sizes = [stored + sum(a.numel() + b.numel() for a, b in statistics.kept(index).values()) for stored, index in zip(run.store.sizes, run.shard)]
    for block in blocks(len(run.store), sizes):
        items = [(run.shard[j], {**statistics.kept(run.shard[j]), **run.store.get(j)}) for j in block]
        for numbers in evaluate(items, plans, loo_adapters, run.device):
            record = run.records[numbers.index]
            record.sha256 = run.digests.result(numbers.index)
            residual, total = (sum(p[i] for p in numbers.parts.values()) for i in (0, 1))
            record.rel_error, record.norm = relative(residual, total), total**0.5
            loadings_spool.add(f"adapter.{numbers.index}.loadings", pack_loadings(numbers.loadings, order))
            loadings_spool.add(f"adapter.{numbers.index}.info", info_tensor(record, order))
            numbers.loadings = {}
            found.append(numbers)
            step += 1
            yield Progress(step, len(run.shard), stage="projection")
    loadings_spool.close()
    return [{"path": str(s.path), "entries": [e.as_json() for e in s.entries], "size": s.size} for s in spools], found


def _svd_error(numbers: AdapterNumbers, plans: dict[str, LayerPlan]) -> float:
    """The per-adapter SVD baseline at the numbers this adapter costs in the collection."""
    budgets, costs = {}, {}
    for name, values in numbers.singular.items():
        plan = plans[name]
        k, n_in, n_out = plan.down.shape[0], plan.down.shape[1], plan.up.shape[0]
        budgets[name] = 2 * values.numel() * k + k * (n_in + n_out) / plan.members
        costs[name] = n_in + n_out
    return svd_baseline(numbers.singular, budgets, costs)


def _gather_numbers(run: _Run, numbers: list[AdapterNumbers], plans: dict[str, LayerPlan], group) -> dict:
    """Every adapter's numbers on every rank (global order), and the update sketches."""
    rows = []
    for found in numbers:
        record = run.records[found.index]
        rows.append({
            "index": found.index, "name": record.name, "sha256": record.sha256, "bytes_in": record.bytes_in,
            "bytes_out": 4 * sum(2 * plans[n].down.shape[0] * v.numel() for n, v in found.singular.items()),
            "rel_error": record.rel_error, "norm": record.norm, "layer_errors": {n: relative(*p) for n, p in found.parts.items()},
            "random": relative(*found.random), "loo": relative(*found.loo) if found.loo is not None else None,
            "svd": _svd_error(found, plans),
        })
    rows = sorted((row for rank_rows in all_gather_json(rows, group) for row in rank_rows), key=lambda row: row["index"])
    sketches = None
    if any(plan.sketch is not None for plan in plans.values()):
        sketches = torch.zeros(len(run.sources), SKETCH_SIDE**2, dtype=torch.float64)
        for found in numbers:
            if found.sketch is not None:
                sketches[found.index] = found.sketch
        all_reduce_sum(sketches, group)
    return {"rows": rows, "sketches": sketches}


def _products(gathered: dict, fitted: dict[str, FittedLayer], count: int) -> tuple[Tensor, bool]:
    """(N, N) update inner products summed over layers: exact on gram layers, sketched elsewhere."""
    products = torch.zeros(count, count, dtype=torch.float64)
    for layer in fitted.values():
        if layer.pair_products is not None:
            index = torch.tensor(layer.members)
            products[index.unsqueeze(1), index.unsqueeze(0)] += layer.pair_products.cpu()
    sketches = gathered["sketches"]
    if sketches is not None:
        products += sketches @ sketches.T
    return products, sketches is None


def _report(gathered: dict, fitted: dict[str, FittedLayer], plans: dict[str, LayerPlan], loo, count: int) -> CollectionReport:
    """Per-adapter qualities, the near-duplicate pairs and the verdict from the gathered numbers."""
    rows = gathered["rows"]
    products, exact = _products(gathered, fitted, count)
    means = mean_baseline(products) if count > 1 else [None] * count
    qualities = [
        AdapterQuality(row["name"], row["rel_error"], row["loo"] if count > 1 else None, means[i], row["random"], row["svd"], row["norm"])
        for i, row in enumerate(rows)
    ]
    loo_exact = not loo.sampled and all(plan.loo_exact for plan in plans.values() if plan.loo is not None)
    how = "exact (every direction of the sums)" if loo_exact else "a Rayleigh-Ritz estimate in the top directions of the sums" if not loo.sampled else "sampled"
    note = f"leave-one-out on {len(loo.layers)} of {loo.total_layers} layers and {len(loo.adapters)} of {count} adapters: {how}"
    return build_report(qualities, similar_pairs([row["name"] for row in rows], products), loo_exact, note, exact)


def _adapter_reports(gathered: dict, report: CollectionReport) -> list[AdapterReport]:
    return [
        AdapterReport(
            row["name"], row["rel_error"], row["bytes_in"], row["bytes_out"], row["layer_errors"], row["sha256"],
            quality.loo, quality.mean, quality.random, quality.svd,
        )
        for row, quality in zip(gathered["rows"], report.adapters)
    ]
