"""`studio compress PATH... -o OUT.safetensors (--k K | --energy E)`: LoRAs into shared EigenLoRAx
components plus per-adapter loadings, with the collection's report.

The one compress: `studio.subspace.compress_events` (streaming, memory bounded by one adapter plus
per-layer statistics) for files and for adapters already in memory (the app's collection) alike.
Under `torchrun` / `accelerate launch` the files are sharded across the processes
(`studio.verbs.distributed`); rank 0 writes. ``export_dir`` also writes every stored adapter back
as a plain LoRA. The result carries the collection report (per adapter in-sample and
leave-one-out errors, mean / random / same-bytes SVD baselines, the verdict, near-duplicates)
and warnings when the subspace reconstructs poorly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

from studio.errors import ConfigError
from studio.events import Done, Event, Progress
from studio.options import check as check_fields
from studio.options import Cli, option
from studio.verbs import checks, distributed
from studio.verbs.result import VerbResult
from studio.verbs.text import listing, number, table

MAX_K = 4096
MAX_AUGMENT = 4096
FAITHFUL = 0.01  # a reconstruction error above this is a warning with its number (the project's rule)
POOR_LOO = 0.5  # leave-one-out error above which the subspace is said to fit unseen adapters poorly
NO_STRUCTURE = "no shared structure"  # the verdict's words (studio.subspace.report.verdict)
StatsDtype = Literal["float64", "float32"]
Layout = Literal["kohya", "diffusers"]


@dataclass
class CompressRequest:
    """What to compress, how large the subspace is, where it goes."""

    paths: list[str] = option(help="LoRA files or folders of *.safetensors (the app passes its adapters in memory instead)",
                              cli=Cli(positional=True, metavar="PATH"))
    output: str = option(help="the compressed collection .safetensors to write (never one of the inputs)", cli=Cli(short="-o"))
    k: int | None = option(None, "components per layer", minimum=1, maximum=MAX_K, cli=Cli(one_of="size"))
    energy: float | None = option(None, "per layer, the smallest K explaining this fraction of the energy",
                                  minimum=0, exclusive_minimum=True, maximum=1,
                                  cli=Cli(one_of="size"))
    augment: int = option(0, "P extra seeded random components per layer, orthogonal to the principal ones (for training)",
                          minimum=0, maximum=MAX_AUGMENT)
    base: str | None = option(None, "BASE the LoRAs' keys are placed on, recorded in the file (default: the known base "
                              "they fit best)")
    seed: int = option(0, "seed of completion and augmentation components", minimum=0, maximum=checks.MAX_SEED)
    device: str = option("cpu", "where the math runs: cpu, cuda, cuda:N (cuda:LOCAL_RANK under torchrun)")
    stats_dtype: StatsDtype = option("float64", "per-layer statistics precision (float32 halves their memory)")
    export_dir: str | None = option(None, "also write every stored adapter back as a plain LoRA, DIR/NAME.safetensors",
                                    cli=Cli(metavar="DIR"))
    export_format: Layout = option("kohya", "layout of the --export-dir files: kohya or diffusers")


@dataclass
class CompressOutcome(VerbResult):
    """The subspace's `CompressResult` (report included), the exported LoRAs and the warnings."""

    result: Any  # studio.subspace.CompressResult
    exports: list[Path] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def path(self) -> Path:
        return self.result.path

    def as_json(self) -> dict:
        return {**self.result.as_json(), "exports": [str(p) for p in self.exports], "warnings": self.warnings}

    def as_text(self) -> str:
        return "\n\n".join(part for part in (_adapter_table(self.result), _summary(self.result, self.exports), _duplicates(self.result)) if part)


def _adapter_table(result) -> str:
    rows = [[a.name, f"{a.rel_error:.3e}", number(a.loo_error), number(a.mean_error), number(a.random_error), number(a.svd_error),
             f"{a.bytes_in:,}", f"{a.bytes_out:,}"] for a in result.adapters]
    return table(rows, ["adapter", "in-sample", "LOO", "mean", "random", "SVD same bytes", "bytes in", "loadings bytes"])


def _summary(result, exports: list[Path]) -> str:
    ks = list(result.k.values())
    ratio = result.bytes_out / result.bytes_in if result.bytes_in else float("nan")
    lines = [f"{len(result.adapters)} adapters, {len(ks)} layers, K per layer {min(ks)}..{max(ks)} (mean {sum(ks) / len(ks):.1f})",
             f"size {result.bytes_in:,} -> {result.bytes_out:,} bytes ({ratio:.3f} of the input); wrote {result.path}"]
    if result.report is not None:
        overall = result.report.overall
        lines.append("overall: " + ", ".join(f"{key} {number(overall.get(key))}" for key in ("in_sample", "loo", "mean", "random", "svd")))
        lines.append(f"verdict: {result.report.verdict}")
    lines += [f"note: {note}" for note in result.notes if note]
    if exports:
        lines.append(f"exported {len(exports)} LoRAs to {exports[0].parent}")
    return "\n".join(lines)


def _duplicates(result) -> str:
    pairs = result.report.pairs if result.report is not None else []
    if not pairs:
        return ""
    rows = [[p.first, p.second, f"{p.cosine:.3f}", f"{p.rel_distance:.3f}", p.kind] for p in pairs]
    return "similar adapters\n" + table(rows, ["first", "second", "cosine", "rel distance", "kind"])


def quality_warnings(result) -> list[str]:
    """Warnings a user must read: reconstruction above 1%, poor leave-one-out, no shared structure."""
    warnings = []
    above = sorted((a for a in result.adapters if a.rel_error > FAITHFUL), key=lambda a: -a.rel_error)
    if above:
        worst = ", ".join(f"{a.name} {a.rel_error:.1%}" for a in above[:5])
        warnings.append(f"{len(above)} of {len(result.adapters)} adapters are stored with a relative error above {FAITHFUL:.0%} "
                        f"(largest: {worst}); exports of them differ from the originals")
    report = result.report
    loo = report.overall.get("loo") if report is not None else None
    if loo is not None and loo > POOR_LOO:
        poor = [a.name for a in result.adapters if a.loo_error is not None and a.loo_error > POOR_LOO]
        warnings.append(f"leave-one-out error {loo:.2f} (above {POOR_LOO}): the subspace reconstructs unseen adapters poorly "
                        f"({len(poor)} adapters above: {listing(poor)})")
    if report is not None and NO_STRUCTURE in report.verdict:
        warnings.append(report.verdict)
    return warnings


def _inputs(request: CompressRequest) -> list[Path]:
    from studio.collection import expand_paths

    for path in request.paths:
        checks.existing_path("paths", path)
    return expand_paths(request.paths)


def check(request: CompressRequest, sources: Sequence[Any] | None = None) -> list[Path]:
    """Every field; the inputs exist (unless ``sources`` are given); nothing written would replace an input."""
    check_fields(request, "compress")
    checks.one_of("compress", k=request.k, energy=request.energy)
    checks.device("device", request.device)
    if sources is None and not request.paths:
        raise ConfigError("compress: paths: give at least one LoRA file or folder")
    inputs = _inputs(request) if sources is None else []
    checks.output_file("output", request.output, inputs)
    if request.export_dir is not None:
        folder = checks.output_folder("export_dir", request.export_dir)
        for path in inputs:
            checks.output_file("export_dir", folder / f"{path.stem}.safetensors", [*inputs, Path(request.output)])
    return inputs


def run(request: CompressRequest, sources: Sequence[Any] | None = None) -> Iterator[Event]:
    """Compress ``request.paths`` (or the in-memory ``sources``: `studio.subspace.HeldSource`s) as
    events: both passes' progress, the saved file, exports, then ``Done(CompressOutcome)``."""
    import torch

    from studio.subspace import SubspaceSpec, compress_events, file_sources
    from studio.subspace.stream import CompressSettings

    inputs = check(request, sources)
    sources = file_sources(inputs, _loader(request.base)) if sources is None else sources
    with distributed.joined(request.device) as device:
        spec = SubspaceSpec(k=request.k, energy=request.energy, augment=request.augment, seed=request.seed)
        settings = CompressSettings(base_id=base_label(request.base), device=device, statistics_dtype=getattr(torch, request.stats_dtype))
        events = compress_events(sources, request.output, spec, settings)
        result = None
        for event in events:
            if isinstance(event, Done):
                result = event.result
            else:
                yield event
        exports = (yield from _export_all(result, request)) if request.export_dir and distributed.is_main_process() else []
    yield Done(CompressOutcome(result, exports, quality_warnings(result)))


def base_label(base: str | None) -> str:
    """What the file records as its base: ``world``, a hub id, or a folder / file's name ('' : detected)."""
    if not base:
        return ""
    return base if base == "world" or "/" not in base or not Path(base).exists() else Path(base).name


def _loader(base: str | None):
    """Reads each file placed on BASE's module tree (built once); None: the reader's best guess."""
    if not base:
        return None
    from studio.bases import module_tree
    from studio.formats import load_adapter

    tree = module_tree(base)
    return lambda path: load_adapter(path, tree)


def _export_all(result, request: CompressRequest):
    """Every stored adapter as a plain LoRA in ``export_dir`` (one progress step each)."""
    from studio.formats import save_adapter

    folder = Path(request.export_dir)
    written = []
    for step, name in enumerate(result.collection.names, start=1):
        written.append(save_adapter(result.collection.export(name), folder / f"{name}.safetensors", format=request.export_format))
        yield Progress(step, len(result.collection.names), None, "export")
    return written
