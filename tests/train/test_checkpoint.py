"""Checkpoint folders: what a kill leaves half-written is cleaned on the next start; modes follow the umask."""

from __future__ import annotations

import os
import stat

import pytest

from studio.events import Message, run_to_end
from studio.train import checkpoint, train
from tests.train.helpers import tiny_config


@pytest.fixture
def umask_022():
    before = os.umask(0o022)
    yield
    os.umask(before)


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_leftovers_of_a_killed_run_are_removed_on_resume_and_outputs_get_umask_modes(tiny_pipeline_dir, style_data, tmp_path, umask_022):
    out = tmp_path / "run"
    config = tiny_config(tiny_pipeline_dir, style_data, out, adapter={"rank": 2}, steps=2, checkpoint_every=1, export_format="kohya")
    run_to_end(train(config))
    folder = out / "checkpoints"
    # what kill -9 leaves: a checkpoint folder being written, atomic-write temporaries
    half = folder / ".step-000003.4242-deadbeef"
    half.mkdir()
    (half / "adapter.safetensors").write_bytes(b"partial")
    temporaries = [out / ".adapter.safetensors.k2j4h5.tmp", folder / ".latest.abc123.tmp", out / "best" / ".adapter.safetensors.x_1.tmp"]
    for path in temporaries:
        path.write_bytes(b"partial")
    kept = [out / ".hidden-note", folder / "step-000002", out / "notes.tmp"]
    kept[0].write_text("mine")
    kept[2].write_text("mine too")
    assert sorted(p.name for p in checkpoint.clean_leftovers(out)) == sorted([half.name] + [p.name for p in temporaries])
    assert not half.exists() and not any(p.exists() for p in temporaries) and all(p.exists() for p in kept)
    half.mkdir()
    events = list(train(config, resume_dir=out))
    assert events[-1].result.status == "done" and not half.exists()
    assert any(isinstance(e, Message) and "removed 1 half-written file(s)" in e.text and half.name in e.text for e in events)
    for path in (folder / "step-000002", out / "best"):
        assert _mode(path) == 0o755, (path, oct(_mode(path)))
    for path in (*(folder / "step-000002").iterdir(), folder / "latest", out / "adapter.safetensors", out / "config.toml",
                 next(out.glob("*.lora.safetensors")), out / "best" / "adapter.safetensors"):
        assert _mode(path) == 0o644, (path, oct(_mode(path)))
