"""`studio export IN -o OUT`: a LoRA file (or one adapter of a compressed collection) written in
the kohya or diffusers layout, or in the layout one tool reads exactly (``--for comfyui``).

What the export costs is stated: a LoHa/LoKr conversion's error, a collection member's
reconstruction error and each checked tool's reading of the written file; above 1% it is a
warning with the number. The output is checked before anything is read: never the input (also
through a symlink or hard link), never a folder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from studio.errors import ConfigError
from studio.options import check as check_fields
from studio.options import Cli, option
from studio.verbs import checks
from studio.verbs.result import VerbResult

FAITHFUL = 0.01  # relative dW error above which an export is a warning, with its number (the project's rule)
MAX_RANK = 4096
Layout = Literal["kohya", "diffusers"]
Tool = Literal["kohya", "comfyui", "a1111", "diffusers"]
WARNING_PREFIX = "warning: "


@dataclass
class ExportRequest:
    """What to export, where, in which layout."""

    input: str = option(help="a LoRA file, or a compressed collection (with --adapter NAME, or COLLECTION.safetensors#NAME)",
                        cli=Cli(positional=True, metavar="IN"))
    output: str = option(help="the .safetensors file to write (never the input, never a folder)", cli=Cli(short="-o"))
    format: Layout = option("kohya", "layout to write: kohya (lora_unet_* with .alpha) or diffusers (lora_A / lora_B)")
    tool: Tool | None = option(None, "write the layout this tool reads exactly (instead of --format) and check the "
                               "written file with that tool's key and scale rules", cli=Cli(flag="--for"))
    adapter: str | None = option(None, "the adapter to export from a compressed collection")
    base: str | None = option(None, "BASE to place the LoRA's keys on (default: the known base it fits best)")
    lycoris_rank: int | None = option(None, "rank LoHa/LoKr layers are converted at (default: per layer, the smallest "
                                      "rank reaching a 1% error)", minimum=1, maximum=MAX_RANK)


@dataclass
class ExportResult(VerbResult):
    """The written file, its layout, and what the export cost."""

    path: Path
    layout: str
    error: float | None = None  # largest relative dW error known (conversion, reconstruction, tool reading)
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def as_json(self) -> dict:
        return {"path": str(self.path), "layout": self.layout, "error": self.error, "notes": self.notes, "warnings": self.warnings}

    def as_text(self) -> str:
        lines = [f"note: {note}" for note in self.notes]
        error = "" if self.error is None else f", relative error {self.error:.2e}"
        return "\n".join(lines + [f"wrote {self.path} ({self.layout}{error})"])


def source_of(request: ExportRequest) -> tuple[Path, str | None]:
    """The input file and the collection member to export (``--adapter`` or ``#NAME``)."""
    target, member = checks.split_member(request.input)
    if member is not None and request.adapter is not None and member != request.adapter:
        raise ConfigError(f"export: input names member {member!r} but --adapter is {request.adapter!r}")
    return checks.existing_file("input", target), member or request.adapter


def check(request: ExportRequest) -> tuple[Path, str | None]:
    """Every field; the input exists (and holds the member); the output may be written."""
    from studio.subspace import is_collection_file

    check_fields(request, "export")
    path, member = source_of(request)
    checks.output_file("output", request.output, [path])
    if member is not None:
        checks.collection_member("adapter", path, member)
    elif is_collection_file(path):
        raise ConfigError(f"export: {path} is a compressed collection; name the adapter to export with --adapter NAME")
    return path, member


def run(request: ExportRequest) -> ExportResult:
    """Read, write, and state the error."""
    from studio.formats import export_for, load_adapter, save_adapter
    from studio.subspace import CompressedCollection

    path, member = check(request)
    native_error = None
    if member is not None:
        lora = CompressedCollection.load(path).export(member)
    elif _is_native(path):
        lora, native_error = _native(path, request.base)
    else:
        lora = load_adapter(path, request.base, lycoris_rank=request.lycoris_rank)
    notes = [n for n in lora.notes if not n.startswith(WARNING_PREFIX)]
    warnings = [n[len(WARNING_PREFIX):] for n in lora.notes if n.startswith(WARNING_PREFIX)]
    errors = _reconstruction(lora, member, warnings) + ([native_error] if native_error is not None else [])
    if request.tool is not None:
        done = export_for(lora, request.output, request.tool, tree=_tree(request.base))
        for message in done.messages:
            (warnings if message.level == "warning" else notes).append(message.text)
        errors += [reading.max_error for reading in done.checks.values()]
        return ExportResult(done.path, f"{done.layout} for {request.tool}", max(errors, default=None), notes, warnings)
    written = save_adapter(lora, request.output, format=request.format)
    return ExportResult(written, request.format, max(errors, default=None), notes, warnings)


def _is_native(path: Path) -> bool:
    """Whether the input is a studio-trained adapter file (``runs/RUN/adapter.safetensors``, ``best/``)."""
    from studio.formats import read_header
    from studio.train.native import is_native

    try:
        return is_native(read_header(path)[1])
    except Exception:  # noqa: BLE001 - not readable as safetensors: the LoRA reader names the problem
        return False


def _native(path: Path, base: str | None):
    """A trained-adapter file as a LoRA (exactly where its family allows) and the export's error."""
    from studio.train.native import native_to_lora

    export = native_to_lora(path, base)
    return export.adapter, export.relative_error


def _reconstruction(lora, member: str | None, warnings: list[str]) -> list[float]:
    """A collection member's stored reconstruction error (a warning above 1%)."""
    if member is None:
        return []
    error = float(lora.metadata.get("studio.reconstruction_error", "nan"))
    if not error <= FAITHFUL:
        warnings.append(f"{member}: reconstructed from the compressed collection with relative error {error:.2%} "
                        f"(above {FAITHFUL:.0%}): the exported LoRA is not the original")
    return [error] if error == error else []


def _tree(base: str | None):
    from studio.bases import module_tree

    return module_tree(base) if base else None
