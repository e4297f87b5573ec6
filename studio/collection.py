"""Collections: adapters for one base, loaded from folders or files, with a report per adapter.

A file that cannot be read, or that belongs to another base, is reported with its error and left
out; the rest of the collection stays usable. The studio's own files read too: a trained-adapter
file (``runs/RUN/adapter.safetensors``, any family) comes in as the LoRA it exports to (exactly
where the family allows, else with its error stated); a compressed collection is named as one.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from studio.bases import ARCH_LABELS, ModuleTree, module_tree
from studio.errors import StudioError
from studio.formats.reader import check_lycoris_rank, load_adapter
from studio.formats.safe import PICKLE_SUFFIXES, shown_metadata

if TYPE_CHECKING:  # torch-bound: imported where adapters are built (`studio inspect` reads headers without torch)
    from studio.adapters.lora import LoraAdapter

ADAPTER_SUFFIXES = {".safetensors"} | PICKLE_SUFFIXES  # pickles are listed so that they are refused by name
RECONSTRUCTION_FAITHFUL = 0.01  # a reconstruction's relative error above this is a warning


@dataclass
class AdapterInfo:
    """What `studio inspect` reports for one file."""

    path: str
    name: str
    format: str = ""
    rank: int | list[int] = 0
    alpha: float | list[float] = 0.0
    layers: int = 0
    targets: dict[str, list[str]] = field(default_factory=dict)
    base_guess: str = ""
    size: int = 0
    trigger_words: list[str] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    error: str | None = None

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Collection:
    """Loaded adapters by name, plus one info row per file (errors included)."""

    adapters: dict[str, LoraAdapter]
    infos: list[AdapterInfo]
    base_arch: str = ""


def expand_paths(paths: list[str | Path]) -> list[Path]:
    """Files as given, and the adapter files directly inside given folders (sorted)."""
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in ADAPTER_SUFFIXES)
            if not found:
                raise StudioError(f"{path}: folder holds no adapter files (.safetensors)")
            files.extend(found)
        else:
            files.append(path)
    if not files:
        raise StudioError("no adapter files given")
    return files


def module_kind(module: str) -> str:
    """A short name for what a module is: ``attn1.to_q``, ``ff.net.2``, ``self_attn.q_proj``, ``proj_in``."""
    _, _, path = module.partition(".")
    match = re.search(r"(?:transformer_blocks|layers)\.\d+\.(.+)$", path)
    return match.group(1) if match else path.rsplit(".", 1)[-1]


def targets_of(adapter: LoraAdapter) -> dict[str, list[str]]:
    """Module kinds an adapter targets, per component."""
    kinds: dict[str, set[str]] = {}
    for module in adapter.lora_layers:
        kinds.setdefault(module.partition(".")[0], set()).add(module_kind(module))
    return {component: sorted(names) for component, names in sorted(kinds.items())}


def trigger_words(metadata: dict[str, str], limit: int = 5) -> list[str]:
    """Trigger words: ``modelspec.trigger_phrase``, else kohya's most frequent tags."""
    phrase = metadata.get("modelspec.trigger_phrase") or metadata.get("ss_trigger_word")
    if phrase:
        return [word.strip() for word in phrase.split(",") if word.strip()]
    try:
        frequency = json.loads(metadata.get("ss_tag_frequency", "{}"))
    except (ValueError, RecursionError):  # not JSON, or nested too deeply: no trigger words from it
        return []
    counts: Counter = Counter()
    for tags in frequency.values() if isinstance(frequency, dict) else ():
        if isinstance(tags, dict):
            counts.update({str(tag): n for tag, n in tags.items() if _is_count(n)})
    return [tag for tag, _ in counts.most_common(limit)]


def _is_count(value) -> bool:
    """A finite, non-negative tag count (JSON allows NaN, Infinity, booleans and huge numbers)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


def _single(values: list):
    return values[0] if len(values) == 1 else values


def describe(path: Path, adapter: LoraAdapter) -> AdapterInfo:
    """The report row of a loaded adapter."""
    return AdapterInfo(
        path=str(path),
        name=adapter.name,
        format=adapter.source_format,
        rank=_single(adapter.ranks),
        alpha=_single(adapter.alphas),
        layers=len(adapter.lora_layers),
        targets=targets_of(adapter),
        base_guess=ARCH_LABELS.get(adapter.base_arch, adapter.base_arch),
        size=path.stat().st_size,
        trigger_words=trigger_words(adapter.metadata),
        metadata=shown_metadata(adapter.metadata),
        notes=list(adapter.notes) + reconstruction_notes(adapter.metadata),
    )


def reconstruction_notes(metadata: dict[str, str]) -> list[str]:
    """A LoRA rebuilt from a compressed collection says so, with its error (a warning above 1%),
    so that nobody takes it for the original file."""
    source = metadata.get("studio.reconstructed_from")
    if source is None:
        return []
    try:
        error = float(metadata.get("studio.reconstruction_error", "nan"))
    except ValueError:
        error = math.nan
    level = "" if error <= RECONSTRUCTION_FAITHFUL else "warning: "
    said = f"relative error {error:.2%}" if math.isfinite(error) else "its error is not recorded"
    return [f"{level}reconstructed from the compressed collection {source} ({said}), not the original file"]


def load_collection(paths: list[str | Path], base: str | None = None, lycoris_rank: int | None = None) -> Collection:
    """Load every adapter file under ``paths``; per-file errors are reported, not raised.

    With ``base`` every adapter is checked against that base; without, the collection's base is
    the one most adapters fit, and adapters for another base are refused with a clear message.
    One file that cannot be read never hides the others: it becomes an error row.
    """
    from studio.subspace.collection import is_collection_file

    check_lycoris_rank(lycoris_rank)
    tree: ModuleTree | None = module_tree(base) if base else None
    adapters: dict[str, LoraAdapter] = {}
    infos: list[AdapterInfo] = []
    for path in expand_paths(paths):
        try:
            if is_collection_file(path):
                infos.append(_collection_row(path))
                continue
            adapter = load_adapter(path, tree, lycoris_rank=lycoris_rank)  # native trained files too (formats.reader.STUDIO_FILES)
            info = describe(path, adapter)
        except StudioError as error:
            infos.append(AdapterInfo(path=str(path), name=path.stem, error=str(error), size=_size(path)))
            continue
        except OSError as error:  # unreadable (permissions, a vanished or broken file): that file only
            infos.append(AdapterInfo(path=str(path), name=path.stem, size=_size(path), error=f"{path}: cannot be read: {error}"))
            continue
        except (ValueError, TypeError, IndexError, KeyError, RuntimeError, RecursionError, OverflowError) as error:
            # A reader bug must not hide the rest of the folder; it is reported as what it is.
            infos.append(AdapterInfo(path=str(path), name=path.stem, size=_size(path),
                                     error=f"{path}: could not be read (unexpected {type(error).__name__}: {error}); please report this file"))
            continue
        if adapter.name in adapters:
            info.error = f"{path}: duplicate adapter name {adapter.name!r} (already loaded from another file); skipped"
        else:
            adapters[adapter.name] = adapter
        infos.append(info)
    base_arch = tree.arch if tree and not tree.alternatives else _majority_arch(adapters)  # ``sd3``: Large or Medium
    _refuse_other_bases(adapters, infos, base_arch)
    return Collection(adapters, infos, base_arch)


def _collection_row(path: Path) -> AdapterInfo:
    """A compressed collection is reported as what it is: its members, its K, its verdict."""
    from studio.subspace.collection import CompressedCollection

    try:
        collection = CompressedCollection.load(path)
    except StudioError as error:
        return AdapterInfo(path=str(path), name=path.stem, error=str(error), size=_size(path))
    names = [summary["name"] for summary in collection.summaries]
    ks = sorted({sub.k for sub in collection.layers.values()})
    notes = [f"compressed EigenLoRAx collection of {len(names)} adapters: {', '.join(names[:8])}{', ...' if len(names) > 8 else ''}",
             f"use a member as {path.name}#NAME (generate, export --adapter NAME)"]
    verdict = (collection.report or {}).get("verdict")
    if verdict:
        notes.append(f"verdict: {verdict}")
    return AdapterInfo(path=str(path), name=path.stem, format="eigenlora-collection", rank=ks[0] if len(ks) == 1 else ks,
                       layers=len(collection.layers), base_guess=collection.base_id, size=_size(path), notes=notes)


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else 0


def _majority_arch(adapters: dict[str, LoraAdapter]) -> str:
    counts = Counter(adapter.base_arch for adapter in adapters.values())
    return counts.most_common(1)[0][0] if counts else ""


def _refuse_other_bases(adapters: dict[str, LoraAdapter], infos: list[AdapterInfo], base_arch: str) -> None:
    for info in infos:
        adapter = adapters.get(info.name)
        if info.error or adapter is None or adapter.base_arch == base_arch:
            continue
        label = ARCH_LABELS.get(base_arch, base_arch)
        info.error = f"{info.path}: this LoRA is for {info.base_guess}, the collection's base is {label}; left out"
        del adapters[info.name]
