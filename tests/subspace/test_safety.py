"""Compress never writes onto an input, re-runs into the folder it reads, cleans what a kill left,
and writes files with the mode the umask gives."""

from __future__ import annotations

import os
import stat
import time

import pytest

from studio.errors import StudioError
from studio.events import Message
from studio.subspace import CompressedCollection, SubspaceSpec, compress_events, compress_files, file_sources
from studio.subspace.stream import remove_stale
from tests.subspace.streaming_helpers import load_plain, save_plain
from tests.subspace.synthetic import shared_collection


@pytest.fixture()
def zoo(tmp_path):
    folder = tmp_path / "zoo"
    folder.mkdir()
    for adapter in shared_collection(3, rank=4, true_k=6):
        save_plain(adapter, folder / f"{adapter.name}.safetensors")
    return folder


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("how", ["folder", "file list", "symlink", "hardlink"])
def test_output_naming_an_input_is_refused_before_anything_is_written(zoo, tmp_path, how):
    target = zoo / "lora_01.safetensors"
    paths = [zoo] if how == "folder" else sorted(zoo.iterdir())
    output = target
    if how == "symlink":
        output = tmp_path / "link.safetensors"
        output.symlink_to(target)
    elif how == "hardlink":
        output = tmp_path / "hard.safetensors"
        os.link(target, output)
    before = _snapshot(zoo)
    with pytest.raises(StudioError, match="would replace the input LoRA .*lora_01"):
        compress_files(paths, output, k=6, loader=load_plain)
    assert _snapshot(zoo) == before  # input intact, no temporary files left in the folder
    assert not list(tmp_path.glob(".*"))


def test_rerun_into_the_folder_it_reads_skips_the_old_collection(zoo):
    output = zoo / "collection.safetensors"
    first = compress_files([zoo], output, k=6, loader=load_plain)
    events = list(compress_events(file_sources([zoo], load_plain), output, SubspaceSpec(k=6)))
    messages = [e.text for e in events if isinstance(e, Message)]
    assert messages == [f"{output}: a compressed collection, not a LoRA; skipped"]
    second = events[-1].result
    assert [a.name for a in second.adapters] == [a.name for a in first.adapters] == ["lora_00", "lora_01", "lora_02"]
    assert CompressedCollection.load(output).names == ["lora_00", "lora_01", "lora_02"]


def test_leftovers_of_a_killed_run_are_removed_and_live_ones_kept(zoo, tmp_path):
    output = tmp_path / "out.safetensors"
    dead = tmp_path / ".out.safetensors.99999999.abcd.spool"  # no such pid
    dead.mkdir()
    (dead / "factors.spool").write_bytes(b"x" * 100)
    old_style = tmp_path / ".out.safetensors.rank0.spool"
    old_style.write_bytes(b"y")
    old_tmp = tmp_path / ".out.safetensors.k2j3.tmp"
    old_tmp.write_bytes(b"z")
    os.utime(old_tmp, (time.time() - 3600, time.time() - 3600))
    alive = tmp_path / f".out.safetensors.{os.getppid()}.live.spool"  # the parent process runs
    alive.mkdir()
    compress_files([zoo], output, k=6, loader=load_plain)
    assert not dead.exists() and not old_style.exists() and not old_tmp.exists()
    assert alive.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([alive.name, "out.safetensors", "zoo"])
    assert remove_stale(output) == []


def test_outputs_get_the_umask_mode(zoo, tmp_path):
    previous = os.umask(0o022)
    try:
        output = tmp_path / "out.safetensors"
        compress_files([zoo], output, k=6, loader=load_plain)
        assert stat.S_IMODE(output.stat().st_mode) == 0o644
        os.umask(0o027)
        compress_files([zoo], output, k=6, loader=load_plain)
        assert stat.S_IMODE(output.stat().st_mode) == 0o640
    finally:
        os.umask(previous)


def test_factor_store_keeps_then_spills_and_reads_back(tmp_path):
    import torch

    from studio.subspace.store import FactorStore

    generator = torch.Generator().manual_seed(0)
    items = [{f"l{j}": (torch.randn(2, 3 + j, generator=generator), torch.randn(4, 2, generator=generator)) for j in range(3)} for _ in range(4)]
    store = FactorStore(tmp_path, budget=4 * sum(a.numel() + b.numel() for a, b in items[0].values()) + 1)  # room for one adapter
    for item in items:
        store.add(item)
    assert store.spilled == 3 and store.tiers == ["host", "disk", "disk", "disk"] and store.path.exists()
    for index, item in enumerate(items):
        for name, (a, b) in item.items():
            assert torch.equal(store.get(index)[name][0], a) and torch.equal(store.get(index)[name][1], b)
    store.close()
    assert not store.path.exists()
