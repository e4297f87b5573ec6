"""Where a compress gets its adapters: files on disk or adapters already in memory.

A source loads one adapter on demand; `compress_events` loads each source once (the second pass
works from the kept canonical factors). `prefetched` loads the next sources on a worker thread
(reading and parsing), so reading overlaps the math; `Digests` hashes the files for the
collection records on threads of their own.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Protocol, Sequence

from studio.adapters.lora import LoraAdapter
from studio.errors import StudioError

LOADERS = max(1, min(4, (os.cpu_count() or 2) // 4))  # loader threads: 1 on small machines, up to 4 beside a GPU
PREFETCH = 2 * LOADERS  # sources loaded ahead of the one being processed


class AdapterSource(Protocol):
    """Something that can load one adapter on demand."""

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


@dataclass
class HeldSource:
    """An adapter already in memory, as an `AdapterSource` (the app's collection, tests)."""

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


def held_sources(adapters: Iterable[LoraAdapter]) -> list[HeldSource]:
    """One `HeldSource` per in-memory adapter."""
    return [HeldSource(adapter) for adapter in adapters]


def adapter_files(paths: Iterable[str | Path]) -> list[Path]:
    """Files given directly, plus the adapter files directly inside given folders (as `studio inspect` sees them)."""
    from studio.collection import expand_paths

    return expand_paths(list(paths))


def file_sources(paths: Iterable[str | Path], loader: Callable[[Path], LoraAdapter] | None = None) -> list[FileSource]:
    """One `FileSource` per LoRA file (folders expand to their ``*.safetensors``), for `compress_events`."""
    return [FileSource(path, loader) for path in adapter_files(paths)]


@dataclass
class Loaded:
    """One source's adapter with the record numbers read alongside it (its sha256 comes from
    `Digests`, computed beside the passes)."""

    index: int
    adapter: LoraAdapter
    nbytes: int


def _load(index: int, source: AdapterSource) -> Loaded:
    return Loaded(index, source.load(), source.nbytes())


class Digests:
    """The sources' sha256, computed on their own worker threads while the passes run.

    A compress needs a source's digest only when its record is written (second pass), so hashing
    (1-2 GB of files at a few hundred MB/s per core) stays off the critical path; hashlib and file
    reads release the GIL."""

    def __init__(self, sources: Sequence[AdapterSource], indices: Iterable[int], workers: int = LOADERS) -> None:
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="studio-hash")
        self._found: dict[int, Future] = {index: self._pool.submit(sources[index].sha256) for index in indices}

    def result(self, index: int) -> str:
        """Source ``index``'s sha256 (waits for it; a read error is raised here)."""
        return self._found[index].result()

    def close(self) -> None:
        """Stop hashing (digests not yet asked for are dropped)."""
        self._pool.shutdown(wait=True, cancel_futures=True)


def prefetched(sources: Sequence[AdapterSource], indices: Iterable[int], ahead: int = PREFETCH) -> Iterator[Loaded]:
    """`Loaded` of ``sources[i]`` for each index in order, loading up to ``ahead`` sources in
    advance on `LOADERS` worker threads (file reading and tensor checks release the GIL for
    much of their time). A source's error is raised when its turn comes."""
    order = list(indices)
    with ThreadPoolExecutor(max_workers=LOADERS, thread_name_prefix="studio-load") as pool:
        if order:  # the first load alone: it builds the readers' caches (module trees) once
            first = pool.submit(_load, order[0], sources[order[0]]).result()
        pending: list[Future] = [pool.submit(_load, i, sources[i]) for i in order[1 : 1 + ahead]]
        for position in range(len(order)):
            if position == 0:
                yield first
                continue
            following = position + ahead
            if following < len(order):
                pending.append(pool.submit(_load, order[following], sources[order[following]]))
            yield pending.pop(0).result()


def check_names(names: list[str], what: str = "adapters") -> None:
    """Refuse repeated adapter names (the collection keys its adapters by name)."""
    seen, doubles = set(), set()
    for name in names:
        (doubles if name in seen else seen).add(name)
    if doubles:
        raise StudioError(f"{what} must have unique names; repeated: {sorted(doubles)[:5]} (rename the files)")


def check_bases(arches: Iterable[str]) -> str:
    """The one base architecture the adapters share ("" if unknown); refuse a mix."""
    found = sorted({a for a in arches if a})
    if len(found) > 1:
        raise StudioError(f"the adapters are for different base models ({', '.join(found)}); compress each base separately")
    return found[0] if found else ""
