"""The app's collection: one entry per adapter file (or compressed-collection member), read once.

Each file is read on its own (`studio.collection.load_collection`, the reader `studio inspect`
uses, which also reads the studio's own trained-adapter files), so one file that makes a reader
fail is a refused row and never wedges the others: a reader crash that is not a `StudioError` (a
bug) becomes that file's row with the error named. Compressed collections
(`studio.subspace.CompressedCollection`) give one entry per stored adapter, named ``NAME.eigen``
for the latest compress and ``NAME.<file stem>`` for other collection files. Nothing here
imports gradio.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from studio.collection import AdapterInfo, load_collection
from studio.engine import check_name
from studio.errors import StudioError

LATEST_SUFFIX = "eigen"
KIND_FILE, KIND_TRAINED, KIND_MEMBER, KIND_REFUSED = "LoRA file", "trained", "compressed", "refused"
KIND_RECONSTRUCTION = "reconstruction"  # a LoRA rebuilt from a compressed collection (its header says so)


@dataclass
class Entry:
    """One row: what inspect reports, what the engine registers (None when refused), where from."""

    info: AdapterInfo
    adapter: Any = None
    source: Path | None = None
    kind: str = KIND_FILE
    collection: Path | None = None  # the collection file of a compressed member
    arch: str = ""  # the base architecture the file is for ('' when unknown)
    stamp: tuple[int, int] | None = None  # the file's (size, mtime) when it was read

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def ok(self) -> bool:
        return self.info.error is None and self.adapter is not None


@dataclass
class Library:
    """Files and collections in import order, each read once per base."""

    files: dict[Path, Entry] = field(default_factory=dict)
    collections: dict[Path, list[Entry]] = field(default_factory=dict)
    latest: Path | None = None  # the collection the last compress wrote

    def entries(self) -> list[Entry]:
        return list(self.files.values()) + [e for members in self.collections.values() for e in members]

    def usable(self) -> dict[str, Any]:
        """Every loaded adapter by name (what the engine registers)."""
        return {entry.name: entry.adapter for entry in self.entries() if entry.ok}

    def find(self, name: str) -> Entry:
        for entry in self.entries():
            if entry.name == name:
                return entry
        raise StudioError(f"no adapter named {name!r} in the collection")

    def add_file(self, path: Path, base: str | None) -> Entry:
        """Read one file (if new, or changed since it was read: a resumed run rewrites its LoRA)
        against ``base``; a duplicate name is a refused row."""
        key = path.absolute()
        known = self.files.get(key)
        if known is not None and known.stamp == file_stamp(path):
            return known
        entry = read_file(path, base)
        entry.stamp = file_stamp(path)
        taken = {e.name for e in self.entries() if e.ok and e is not known}
        if entry.ok and entry.name in taken:
            entry.info.error = f"{path.name}: duplicate adapter name {entry.name!r} (already loaded from another file); skipped"
            entry.adapter, entry.kind = None, KIND_REFUSED
        self.files[key] = entry  # a changed file keeps its place in the table
        return entry

    def reread(self, base: str | None) -> None:
        """Read every file again (after the base changed)."""
        paths, self.files = list(self.files), {}
        for path in paths:
            self.add_file(path, base)

    def add_collection(self, path: Path, latest: bool = False) -> list[Entry]:
        """The members of a compressed collection file as entries."""
        from studio.subspace import CompressedCollection

        key = path.absolute()
        if latest:
            self.latest = key
        collection = CompressedCollection.load(path)
        self.collections[key] = [member_entry(collection, name, key, self.suffix(key)) for name in collection.names]
        self._rename_members()
        return self.collections[key]

    def suffix(self, path: Path) -> str:
        return LATEST_SUFFIX if path == self.latest else safe_suffix(path.stem)

    def _rename_members(self) -> None:
        """Members of the latest collection are NAME.eigen, the others NAME.<stem> (after a new compress)."""
        for path, members in self.collections.items():
            for entry in members:
                original = entry.info.metadata.get("member", entry.name)
                entry.info.name = f"{original}.{self.suffix(path)}"

    def remove(self, name: str) -> Entry:
        """Take one entry (a file, or a whole collection through one of its members) out."""
        entry = self.find(name)
        if entry.collection is not None:
            self.collections.pop(entry.collection, None)
            if self.latest == entry.collection:
                self.latest = None
        else:
            self.files.pop(entry.source.absolute(), None)
        return entry


def read_file(path: Path, base: str | None) -> Entry:
    """One file as an entry; a reader failure becomes a refused row (``load_collection`` turns every
    per-file failure, a reader bug included, into an error row; what it raises is about the base)."""
    try:
        collection = load_collection([path], base=base)
    except StudioError as error:
        return refused(path, str(error))
    info = collection.infos[0]
    adapter = collection.adapters.get(info.name)
    if adapter is not None:
        try:
            check_name(info.name)
        except StudioError as error:
            info.error, adapter = str(error), None
    if info.error is not None or adapter is None:
        return Entry(info, None, path, KIND_REFUSED, arch=_arch_of(adapter, info))
    return Entry(info, adapter, path, kind_of(adapter.metadata), arch=adapter.base_arch)


def kind_of(metadata: dict[str, str]) -> str:
    """What a loaded file is: a studio-trained adapter (its family), a reconstruction, or a LoRA file."""
    if "studio.family" in metadata:
        return f"{KIND_TRAINED} ({metadata['studio.family']})"
    if "studio.reconstructed_from" in metadata:
        return KIND_RECONSTRUCTION
    return KIND_FILE


def file_stamp(path: Path) -> tuple[int, int] | None:
    """(size, modification time in ns) of a file, None when it is gone."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_size, stat.st_mtime_ns


def refused(path: Path, error: str) -> Entry:
    size = path.stat().st_size if path.is_file() else 0
    return Entry(AdapterInfo(path=str(path), name=path.stem, error=error, size=size), None, path, KIND_REFUSED)


def member_entry(collection, name: str, path: Path, suffix: str) -> Entry:
    """One stored adapter of a collection as an entry (its reconstruction error in the info)."""
    from studio.bases import ARCH_LABELS

    record = collection.record(name)
    ranks = sorted(set(record.ranks.values()))
    info = AdapterInfo(
        path=str(path), name=f"{name}.{suffix}", format=f"EigenLoRAx member of {path.name}", rank=ranks[0] if len(ranks) == 1 else ranks,
        alpha=0.0, layers=len(record.ranks), base_guess=ARCH_LABELS.get(record.base_arch, record.base_arch),
        size=0, metadata={"member": name, "reconstruction_error": f"{record.rel_error:.4g}", "collection": path.name},
        notes=[f"reconstructed from {path.name} with relative error {record.rel_error:.2%}"],
    )
    check_name(info.name)
    return Entry(info, collection.adapter(name), path, KIND_MEMBER, collection=path, arch=record.base_arch)


def guess_arch(entry: Entry) -> str:
    """The architecture a refused file is for, read again without a base (the reader's best
    guess); '' when that is unknown too. Remembered in the entry."""
    if entry.arch or entry.source is None or entry.kind == KIND_MEMBER or not entry.source.is_file():
        return entry.arch
    try:
        collection = load_collection([entry.source])
    except StudioError:  # the file is refused already; no guess
        return ""
    info = collection.infos[0]
    entry.arch = _arch_of(collection.adapters.get(info.name), info)
    return entry.arch


def safe_suffix(stem: str) -> str:
    """A collection file's stem as a name suffix (letters, digits, '-', '_')."""
    import re

    return re.sub(r"[^A-Za-z0-9_\-]", "_", stem)[:40] or "collection"


def _arch_of(adapter, info: AdapterInfo) -> str:
    """The architecture a refused file is for, when its report names one."""
    from studio.bases import ARCH_LABELS

    if adapter is not None:
        return adapter.base_arch
    by_label = {label: arch for arch, label in ARCH_LABELS.items()}
    return by_label.get(info.base_guess, "")
