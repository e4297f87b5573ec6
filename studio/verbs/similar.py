"""`studio similar FILE COLLECTION`: the adapters closest to one adapter in weight space.

Closeness of updates dW (cosine, relative distance, norm ratio; `studio.subspace.similar`), never
of file bytes. COLLECTION is a compressed collection (its stored reconstructions), or LoRA files
and folders (compared exactly, one at a time).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from studio.errors import ConfigError
from studio.options import check as check_fields
from studio.options import Cli, option
from studio.verbs import checks
from studio.verbs.result import VerbResult
from studio.verbs.text import number, table

DEFAULT_TOP = 20
MAX_TOP = 100_000


@dataclass
class SimilarRequest:
    """Which adapter against which collection."""

    query: str = option(help="the LoRA file to compare", cli=Cli(positional=True, metavar="FILE"))
    against: list[str] = option(help="a compressed collection, or LoRA files / folders",
                                cli=Cli(positional=True, metavar="COLLECTION"))
    top: int = option(DEFAULT_TOP, "rows shown, closest first (0: all)", minimum=0, maximum=MAX_TOP)
    device: str = option("cpu", "where the products run: cpu, cuda, cuda:N")
    base: str | None = option(None, "BASE the LoRAs' keys are placed on (default: the known base each fits best; with a "
                              "BASE, LoRA files to compare against are read up front)")


@dataclass
class SimilarOutcome(VerbResult):
    """The ranked rows (`studio.subspace.SimilarResult`), cut to ``top``."""

    result: Any
    top: int = DEFAULT_TOP
    warnings: list[str] = field(default_factory=list)

    @property
    def rows(self) -> list:
        return self.result.rows[: self.top] if self.top else list(self.result.rows)

    def as_json(self) -> dict:
        data = self.result.as_json()
        data["rows"] = data["rows"][: self.top] if self.top else data["rows"]
        return data

    def as_text(self) -> str:
        rows = [[r.name, f"{r.cosine:.4f}", f"{r.rel_distance:.4f}", f"{r.norm_ratio:.3g}", r.kind, number(r.reconstruction_error)]
                for r in self.rows]
        head = f"closest to {self.result.query} in {self.result.against} ({len(self.result.rows)} compared)"
        return head + "\n" + table(rows, ["adapter", "cosine", "rel distance", "norm ratio", "kind", "stored error"])


def check(request: SimilarRequest) -> None:
    """Every field; the query is a LoRA file and every collection path exists."""
    from studio.subspace import is_collection_file

    check_fields(request, "similar")
    checks.device("device", request.device)
    query = checks.existing_file("query", request.query)
    if is_collection_file(query):
        raise ConfigError(f"similar: query: {query} is a compressed collection; give a LoRA file to compare")
    if not request.against:
        raise ConfigError("similar: against: give a compressed collection or LoRA files")
    for path in request.against:
        checks.existing_path("against", path)


def run(request: SimilarRequest) -> SimilarOutcome:
    """Rank the collection by closeness to the query."""
    from studio.subspace import similar

    check(request)
    query, against = request.query, request.against[0] if len(request.against) == 1 else list(request.against)
    if request.base:
        query, against = _placed(request)
    return SimilarOutcome(similar(query, against, request.device), request.top)


def _placed(request: SimilarRequest):
    """The query and the LoRA files read on BASE's module tree (a collection file stays a path)."""
    from studio.bases import module_tree
    from studio.collection import expand_paths
    from studio.formats import load_adapter
    from studio.subspace import is_collection_file

    tree = module_tree(request.base)
    query = load_adapter(request.query, tree)
    if len(request.against) == 1 and is_collection_file(request.against[0]):
        return query, request.against[0]
    return query, [load_adapter(path, tree) for path in expand_paths(request.against) if not is_collection_file(path)]
