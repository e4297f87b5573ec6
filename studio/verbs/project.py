"""`studio project COLLECTION.safetensors ADAPTER_FILE`: how well an unseen adapter fits a
compressed collection's components (`studio.subspace.project_adapter`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from studio.errors import ConfigError
from studio.options import check as check_fields
from studio.options import Cli, option
from studio.verbs import checks
from studio.verbs.result import VerbResult
from studio.verbs.text import listing, table

MAX_RANK = 4096
POOR = 0.5  # relative error above which the adapter is said to lie mostly outside the subspace
WORST_SHOWN = 5


@dataclass
class ProjectRequest:
    """Which adapter onto which collection."""

    collection: str = option(help="compressed collection .safetensors (from `studio compress`)", cli=Cli(positional=True))
    adapter: str = option(help="LoRA file to project", cli=Cli(positional=True))
    base: str | None = option(None, "BASE to place the LoRA's keys on (default: the known base it fits best)")
    lycoris_rank: int | None = option(None, "rank LoHa/LoKr layers are converted at", minimum=1, maximum=MAX_RANK)


@dataclass
class ProjectOutcome(VerbResult):
    """The subspace's `ProjectResult` and its warnings."""

    result: Any  # studio.subspace.ProjectResult
    warnings: list[str] = field(default_factory=list)

    def as_json(self) -> dict:
        return {**self.result.as_json(), "warnings": self.warnings}

    def as_text(self) -> str:
        result = self.result
        lines = [f"{result.name}: relative error {result.rel_error:.3e} over {len(result.layer_errors)} layers"]
        if result.uncovered_layers:
            lines.append(f"{len(result.uncovered_layers)} layers have no components in the collection (counted as lost): "
                         f"{listing(result.uncovered_layers)}")
        worst = sorted(result.layer_errors.items(), key=lambda item: -item[1])[:WORST_SHOWN]
        return "\n".join(lines) + "\n" + table([[name, f"{error:.3e}"] for name, error in worst], ["worst layers", "rel error"])


def check(request: ProjectRequest) -> None:
    """Every field; the collection is one, the adapter is a LoRA file."""
    from studio.subspace import is_collection_file

    check_fields(request, "project")
    collection = checks.existing_file("collection", request.collection)
    if not is_collection_file(collection):
        raise ConfigError(f"project: collection: {collection} is not a compressed collection (make one with `studio compress`)")
    adapter = checks.existing_file("adapter", request.adapter)
    if is_collection_file(adapter):
        raise ConfigError(f"project: adapter: {adapter} is a compressed collection, not a LoRA file")


def run(request: ProjectRequest) -> ProjectOutcome:
    """Project and report the error (a warning when most of the adapter is lost)."""
    from studio.formats import load_adapter
    from studio.subspace import CompressedCollection, project_adapter

    check(request)
    adapter = load_adapter(request.adapter, request.base, lycoris_rank=request.lycoris_rank)
    result = project_adapter(CompressedCollection.load(request.collection), adapter)
    warnings = []
    if result.rel_error > POOR:
        warnings.append(f"{result.name}: relative error {result.rel_error:.2f} (above {POOR}): the adapter lies mostly outside "
                        "the collection's subspace")
    return ProjectOutcome(result, warnings)
