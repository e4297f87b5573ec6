"""`studio inspect PATH...`: what each adapter file holds (format, rank, alpha, layers, targets, base).

One row per file: a file that cannot be read, or that is for another base, is a row with its
error and the others are still reported (`studio.collection.load_collection`). A path that does
not exist at all is a usage error, raised before anything is read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from studio.errors import ConfigError
from studio.options import check as check_fields
from studio.options import Cli, option
from studio.verbs import checks
from studio.verbs.result import VerbResult
from studio.verbs.text import table

MAX_RANK = 4096  # largest LoHa/LoKr conversion rank accepted


@dataclass
class InspectRequest:
    """Which files to inspect, against which base."""

    paths: list[str] = option(help="LoRA files or folders of them", cli=Cli(positional=True, metavar="PATH"))
    base: str | None = option(None, "check against BASE (world, sd15, sd2, sdxl, flux1, sd3, a diffusers folder, a "
                              ".safetensors checkpoint, a hub id); default: the known base the file fits best")
    lycoris_rank: int | None = option(None, "rank LoHa/LoKr layers are converted at (default: per layer, the smallest "
                                      "rank reaching a 1% error)", minimum=1, maximum=MAX_RANK)


@dataclass
class InspectResult(VerbResult):
    """One `studio.collection.AdapterInfo` per file."""

    infos: list[Any]
    warnings: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        """1 when every file was refused (nothing usable), else 0."""
        return 1 if self.infos and all(info.error for info in self.infos) else 0

    def as_json(self) -> list[dict]:
        return [info.as_dict() for info in self.infos]

    def as_text(self) -> str:
        rows = []
        for info in self.infos:
            if info.error:
                rows.append([info.name, "ERROR", "", "", "", "", "", info.error])
                continue
            targets = "; ".join(f"{c}: {len(k)} kinds" for c, k in info.targets.items())
            rows.append([info.name, info.format, _short(info.rank), _short(info.alpha), str(info.layers), info.base_guess,
                         f"{info.size / 1e6:.1f} MB", ", ".join(info.trigger_words) or targets])
            rows += [["", "note", "", "", "", "", "", note] for note in info.notes]
        return table(rows, ["name", "format", "rank", "alpha", "layers", "base", "size", "trigger words / targets"])


def _short(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def check(request: InspectRequest) -> None:
    """Field types and bounds; every path exists."""
    check_fields(request, "inspect")
    if not request.paths:
        raise ConfigError("inspect: paths: give at least one file or folder")
    for path in request.paths:
        checks.existing_path("paths", path)


def run(request: InspectRequest) -> InspectResult:
    """The report rows of every adapter file under ``request.paths``."""
    from studio.collection import load_collection

    check(request)
    infos = _from_header(request)
    if infos is None:
        infos = load_collection(request.paths, base=request.base, lycoris_rank=request.lycoris_rank).infos
    warnings = [f"{info.name}: {note[len('warning: '):]}" for info in infos for note in info.notes if note.startswith("warning: ")]
    return InspectResult(infos, warnings)


def _from_header(request: InspectRequest) -> list[Any] | None:
    """One plain LoRA file without a base: its row from the header alone (`formats.reader.header_adapter`,
    no torch import; the same row `load_collection` gives). None: read it with the full reader."""
    from pathlib import Path

    from studio.collection import describe
    from studio.formats.reader import header_adapter

    path = Path(request.paths[0])
    if len(request.paths) != 1 or request.base or not path.is_file() or path.suffix.lower() != ".safetensors":
        return None
    adapter = header_adapter(path)
    return None if adapter is None else [describe(path, adapter)]
