"""Streaming extraction: same result as in memory, bounded memory, several processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from studio.events import Done, Progress, Saved
from studio.subspace import CompressedCollection, HeldSource, SubspaceSpec, compress_events, compress_files, compress_sources
from studio.subspace.oracle import gram_compress
from studio.subspace.sources import content_sha256
from tests.ports import free_port
from tests.subspace.streaming_helpers import load_plain, save_plain, sources
from tests.subspace.synthetic import SHAPES, shared_collection

ROOT = Path(__file__).resolve().parents[2]


def _assert_same(a: CompressedCollection, b: CompressedCollection, tolerance: float = 1e-4) -> None:
    assert a.names == b.names and list(a.layers) == list(b.layers)
    for layer in a.layers:
        for side in ("down_components", "up_components", "down_explained"):
            x, y = getattr(a.layers[layer], side), getattr(b.layers[layer], side)
            assert x.shape == y.shape
            assert float((x - y).norm() / max(float(y.norm()), 1e-12)) < tolerance, (layer, side)
    for name in a.names:
        for layer in a.adapter(name).layers():
            x, y = a.adapter(name).delta(layer).detach(), b.adapter(name).delta(layer).detach()
            assert float((x - y).norm() / y.norm()) < tolerance


@pytest.mark.parametrize("spec", [{"k": 5}, {"energy": 0.97}, {"k": 4, "augment": 2}])
def test_streaming_equals_in_memory(tmp_path, spec):
    adapters = shared_collection(7, rank=4, true_k=12)  # 28 rows: Gram route in memory for the wide layers
    in_memory = gram_compress(adapters, **spec)
    streamed = compress_sources([HeldSource(a) for a in adapters], tmp_path / "s.safetensors", **spec)
    _assert_same(streamed.collection, in_memory.collection)
    for x, y in zip(streamed.adapters, in_memory.adapters):
        assert x.rel_error == pytest.approx(y.rel_error, rel=1e-4, abs=1e-7)


def test_compress_events_report_both_passes_per_adapter(tmp_path):
    adapters = shared_collection(5, rank=4, true_k=6)
    output = tmp_path / "c.safetensors"
    events = list(compress_events([HeldSource(a) for a in adapters], output, SubspaceSpec(k=6)))
    progress = [(e.stage, e.step, e.total) for e in events if isinstance(e, Progress)]
    assert progress == [("statistics", i, 5) for i in range(1, 6)] + [("projection", i, 5) for i in range(1, 6)]
    assert [e.path for e in events if isinstance(e, Saved)] == [output]
    assert isinstance(events[-1], Done) and events[-1].result.path == output
    result = events[-1].result
    assert max(a.rel_error for a in result.adapters) < 1e-5  # the synthetic collection spans K=6 exactly
    assert [a.sha256 for a in result.adapters] == [content_sha256(a) for a in adapters]
    _assert_same(result.collection, gram_compress(adapters, k=6).collection)


def test_compress_files_from_folder_records_file_hashes(tmp_path):
    import hashlib

    folder = tmp_path / "zoo"
    folder.mkdir()
    adapters = shared_collection(4, rank=4, true_k=6)
    for adapter in adapters:
        save_plain(adapter, folder / f"{adapter.name}.safetensors")
    result = compress_files([folder], tmp_path / "out.safetensors", k=6, loader=load_plain)
    assert [a.name for a in result.adapters] == [a.name for a in adapters]
    assert max(a.rel_error for a in result.adapters) < 1e-5
    file_hash = hashlib.sha256((folder / "lora_00.safetensors").read_bytes()).hexdigest()
    assert result.collection.record("lora_00").sha256 == file_hash
    assert result.bytes_in == sum(p.stat().st_size for p in folder.iterdir())
    assert not list(tmp_path.glob(".out.safetensors*"))  # spools removed


def _peak_kib(count: int, output: Path) -> int:
    # Large blocks through mmap (returned to the OS when freed) and one arena: the peak then
    # measures what is held, not glibc's fragmentation noise (+-15 MiB otherwise).
    env = {**os.environ, "STUDIO_PEAK_TEST": "1", "PYTHONPATH": str(ROOT), "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_ARENA_MAX": "1"}
    done = subprocess.run([sys.executable, "-m", "tests.subspace.streaming_helpers", str(count), str(output)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return int(done.stdout.strip().splitlines()[-1])


def test_peak_memory_does_not_grow_with_collection_size(tmp_path):
    """4 layers 768 x 768, rank 32: each adapter holds 0.75 MiB; 40 vs 100 adapters (both past
    N r = 768, where layers sum covariances instead of keeping factors). The canonical factors kept
    between the passes are bounded by ``held_bytes`` (4 MiB here; the rest spills to disk)."""
    small = _peak_kib(40, tmp_path / "small.safetensors")
    large = _peak_kib(100, tmp_path / "large.safetensors")
    held_all_mib = 60 * 4 * 2 * 32 * 768 * 4 / 2**20  # what holding the extra adapters would cost: 45 MiB
    grew_mib = (large - small) / 1024
    assert grew_mib < 0.15 * held_all_mib, f"peak grew by {grew_mib:.1f} MiB between 40 and 100 adapters"
    assert CompressedCollection.load(tmp_path / "large.safetensors").names[-1] == "gen_0099"


def test_two_processes_give_the_single_process_result(tmp_path):
    shapes = dict(SHAPES)
    single = compress_sources(sources(9, shapes), tmp_path / "single.safetensors", k=10)
    output = tmp_path / "two.safetensors"
    # A fresh interpreter spawns its two ranks without re-importing pytest (4 s instead of 14 s).
    code = f"from tests.subspace.streaming_helpers import spawn_two; spawn_two({str(output)!r}, 9, {free_port()})"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    both = CompressedCollection.load(output)
    _assert_same(both, single.collection, tolerance=1e-5)
    for name in both.names:
        assert both.record(name).rel_error == pytest.approx(single.collection.record(name).rel_error, rel=1e-5)
    assert not list(tmp_path.glob(".two.safetensors*"))
