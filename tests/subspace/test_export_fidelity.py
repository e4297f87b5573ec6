"""Adapters exported from a compressed world zoo generate (same seed) images close to the originals."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from studio.bases import world_dir

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(not (world_dir() / "loras").is_dir(), reason="embedded world not built")
def test_exported_images_track_reconstruction_error():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from export_fidelity import measure

    from studio.collection import load_collection

    collection = load_collection([world_dir() / "loras"])
    files = {info.name: Path(info.path) for info in collection.infos}
    adapters = list(collection.adapters.values())[:3]
    rows, anchor = measure(adapters, [files[a.name] for a in adapters], ["2", "full"], images=1, steps=6)
    coarse, exact = rows
    assert exact.rel_error < 1e-5 and exact.pixel_diff < 0.5  # of 255: the same image
    assert coarse.rel_error > 0.1 and coarse.pixel_diff > exact.pixel_diff
    assert anchor > 5 * exact.pixel_diff + 1  # the adapters do move the image
