"""`studio run RECIPE.toml`: declarative jobs that call the same verbs as the CLI.

A recipe names its job in ``[job] kind`` and holds that job's typed config in a table of the
same name:

    [job]                      [job]                       [job]
    kind = "world"             kind = "compress"           kind = "benchmark"
    [world]                    [compress]                  [benchmark]
    out_dir = "assets/world"   paths = ["assets/world/loras"]  script = "benchmarks/engine_switch.py"
    ...                        output = "runs/zoo.safetensors" args = ["--quick"]
                               k = 14

A train config (top-level ``base``, ``data``, ``[adapter]`` or ``[[runs]]``) is a recipe too.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

from studio.errors import ConfigError
from studio.events import Done, Event, Message

JobKind = Literal["world", "compress", "train", "benchmark"]


@dataclass
class CompressJob:
    """``[compress]``: compress a collection into one file."""

    paths: list[str]
    output: str
    k: int | None = None
    energy: float | None = None
    augment: int = 0
    base: str | None = None


@dataclass
class BenchmarkJob:
    """``[benchmark]``: run a benchmark script (it prints its own table of ratios)."""

    script: str
    args: list[str] = field(default_factory=list)


def read_recipe(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise ConfigError(f"{path}: no such recipe") from error
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: invalid TOML ({error})") from error


def job_kind(recipe: dict[str, Any], path: Path) -> JobKind:
    kind = recipe.get("job", {}).get("kind")
    if kind is None and ("adapter" in recipe or "runs" in recipe):
        return "train"
    if kind not in ("world", "compress", "train", "benchmark"):
        raise ConfigError(f"{path}: [job] kind must be world, compress, train or benchmark, not {kind!r}")
    return kind


def typed(cls, table: dict[str, Any], where: str):
    """Build a config dataclass from a TOML table, naming unknown or missing keys."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(table) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown}; known: {sorted(known)}")
    try:
        return cls(**table)
    except TypeError as error:
        raise ConfigError(f"{where}: {error}") from error


def _world(recipe: dict, path: Path) -> Iterator[Event]:
    from studio.world.build import build_world
    from studio.world.config import config_from_dict

    yield from build_world(config_from_dict(recipe.get("world", {}), f"{path} [world]"))


def _compress(recipe: dict, path: Path) -> Iterator[Event]:
    from studio.collection import load_collection
    from studio.subspace import compress_events, held_sources

    job = typed(CompressJob, recipe.get("compress", {}), f"{path} [compress]")
    collection = load_collection(job.paths, base=job.base)
    for info in collection.infos:
        if info.error:
            yield Message(info.error, "warning")
    yield from compress_events(held_sources(collection.adapters.values()), job.output, k=job.k, energy=job.energy,
                               augment=job.augment, base_id=job.base or "")


def _train(recipe: dict, path: Path) -> Iterator[Event]:
    from studio.train import config as train_config
    from studio.train.loop import train

    for config in train_config.load_runs(path):
        yield from train(config)


def _benchmark(recipe: dict, path: Path) -> Iterator[Event]:
    job = typed(BenchmarkJob, recipe.get("benchmark", {}), f"{path} [benchmark]")
    completed = subprocess.run([sys.executable, job.script, *job.args], check=False)
    if completed.returncode:
        raise ConfigError(f"{path}: benchmark {job.script} exited with {completed.returncode}")
    yield Done(completed.returncode)


JOBS: dict[str, Callable[[dict, Path], Iterator[Event]]] = {
    "world": _world, "compress": _compress, "train": _train, "benchmark": _benchmark,
}


def run_recipe(path: str | Path) -> Iterator[Event]:
    """Execute a recipe file, yielding its job's events."""
    path = Path(path)
    recipe = read_recipe(path)
    yield from JOBS[job_kind(recipe, path)](recipe, path)
