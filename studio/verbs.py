"""Every verb of the studio as a plain function. The CLI, the web app and recipes call these."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from studio.collection import AdapterInfo, load_collection
from studio.formats import load_adapter, save_adapter


def inspect(paths: list[str | Path], base: str | None = None) -> list[AdapterInfo]:
    """One report row per adapter file (errors included, never raised per file)."""
    return load_collection(paths, base=base).infos


def export(
    source: str | Path,
    output: str | Path,
    format: Literal["kohya", "diffusers"] = "kohya",
    adapter: str | None = None,
    base: str | None = None,
    lycoris_rank: int | None = None,
    tool: str | None = None,
) -> tuple[Path, list[str]]:
    """Write a LoRA file (or one adapter of a compressed collection) in kohya or diffusers layout.

    ``tool`` (kohya, comfyui, a1111, diffusers) picks the layout that tool reads exactly instead
    of ``format`` and checks the written file with that tool's key rules.
    """
    if adapter is not None:
        from studio.subspace.collection import export_from_collection

        lora = export_from_collection(source, adapter)
    else:
        lora = load_adapter(source, base, lycoris_rank=lycoris_rank)
    if Path(output).resolve() == Path(source).resolve():
        raise ValueError(f"{output}: refusing to overwrite the input file")
    if tool is not None:
        from studio.formats import export_for

        done = export_for(lora, output, tool)
        return done.path, list(lora.notes) + [f"{m.level}: {m.text}" if m.level != "info" else m.text for m in done.messages]
    return save_adapter(lora, output, format=format), list(lora.notes)
