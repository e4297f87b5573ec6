"""Fixtures of the verb tests: LoRA files and a compressed collection for the tiny pipeline, a
style folder, a train config, the session's tiny engine reachable by `studio generate --base`."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from tests.app.conftest import write_zoo
from tests.threads import one_cpu_thread  # noqa: F401  (autouse here)
from tests.train.helpers import style_folder

ZOO = 3
TRAIN_CONFIG = """
base = "{base}"
data = "{data}"
output_dir = "{out}"
steps = 2
batch_size = 2
learning_rate = 0.003
tensorboard = false
export_format = "none"
validation_split = 0.25
{extra}
[adapter]
family = "lora"
{knobs}
"""


def train_config(path: Path, base: Path, data: Path, out: Path, extra: str = "", knobs: str = "rank = 2") -> Path:
    """A tiny train config file (2 steps of a rank-2 LoRA on the tiny pipeline); a key given in
    ``extra`` (top level) or ``knobs`` ([adapter]) replaces the template's line of that key."""
    text = TRAIN_CONFIG.format(base=base, data=data, out=out, extra=extra, knobs=knobs)
    head, _, tail = text.partition("[adapter]")
    path.write_text(_replaced(head, extra) + "\n[adapter]" + _replaced(tail, knobs))
    return path


def _replaced(text: str, given: str) -> str:
    keys = {line.split("=")[0].strip() for line in given.splitlines() if "=" in line}
    mine = set(given.splitlines())
    return "\n".join(line for line in text.splitlines() if line.split("=")[0].strip() not in keys or line in mine) + "\n"


def digest(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (symlinks by their own target path)."""
    out = {}
    for path in sorted(folder.rglob("*")):
        if path.is_symlink():
            out[str(path)] = "link:" + str(path.readlink())
        elif path.is_file():
            out[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="session")
def zoo(tiny_pipeline_dir, tmp_path_factory) -> Path:
    """A folder of ``ZOO`` kohya LoRAs for the tiny pipeline (style0 ...)."""
    return write_zoo(tiny_pipeline_dir, tmp_path_factory.mktemp("verbs-zoo"), count=ZOO)


@pytest.fixture(scope="session")
def collection(zoo, tiny_pipeline_dir, tmp_path_factory) -> Path:
    """The zoo compressed at K = 2 through the compress verb."""
    from studio.events import run_to_end
    from studio.verbs.compress import CompressRequest, run

    out = tmp_path_factory.mktemp("verbs-collection") / "zoo.safetensors"
    run_to_end(run(CompressRequest([str(zoo)], str(out), k=2, base=str(tiny_pipeline_dir))))
    return out


@pytest.fixture(scope="session")
def style_data(tmp_path_factory) -> Path:
    return style_folder(tmp_path_factory.mktemp("verbs-style") / "data", 8)


@pytest.fixture
def tiny(tiny_pipeline_dir, monkeypatch) -> str:
    """``--base`` of the tiny pipeline; `studio generate` reuses one engine for it (the verb keeps
    engines per base, device and dtype)."""
    from studio.engine import verbs as engine_verbs

    engine = _session_engine(tiny_pipeline_dir)
    monkeypatch.setitem(engine_verbs._ENGINES, (str(tiny_pipeline_dir), "cpu", "torch.float32"), engine)
    engine.restore()
    return str(tiny_pipeline_dir)


_ENGINE = {}


def _session_engine(folder: Path):
    from studio.engine import Engine, EngineConfig

    if folder not in _ENGINE:
        _ENGINE[folder] = Engine.load(str(folder), EngineConfig(device="cpu", dtype="float32"))
    return _ENGINE[folder]
