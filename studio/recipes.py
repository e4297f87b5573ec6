"""`studio run RECIPE.toml`: recipe files as jobs, each a verb and that verb's request.

A job's table holds the fields of its verb's request (`studio.verbs.VERBS`), the same fields,
defaults and checks as the command line's flags:

    [job]                        [[jobs]]                         [[jobs]]
    kind = "compress"            verb = "dataset"                 verb = "train"
    [compress]                   style = "noir"                   config = "pipelines/train_lora.toml"
    paths = ["assets/world/loras"]  output = "runs/data/noir"     steps = 100
    output = "runs/zoo.safetensors"
    k = 14

One job: ``[job] kind = "VERB"`` (or ``verb``) and a ``[VERB]`` table. Several: ``[[jobs]]``, each
with ``verb`` and its fields. A train config (top-level ``base``, ``data``, ``[adapter]`` or
``[[runs]]``; or ``[job] kind = "train"`` without a ``[train]`` table) is a train job on itself.
``kind = "world"`` takes the world room's ``[world]`` table; ``kind = "benchmark"`` a script.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from studio.errors import ConfigError

TRAIN_KEYS = ("adapter", "runs")  # a file with these at the top level is a train config


@dataclass
class Job:
    """One job: the verb, its request, and where in the recipe it was written."""

    verb: Any  # studio.verbs.Verb
    request: Any
    where: str


def read_recipe(path: str | Path) -> dict[str, Any]:
    """The recipe's TOML, or a ConfigError naming the file."""
    path = Path(path)
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise ConfigError(f"{path}: no such recipe") from error
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: invalid TOML ({error})") from error


def _verb(name: Any, where: str):
    from studio.verbs import VERBS

    usable = sorted(n for n, v in VERBS.items() if v.recipe)
    if not isinstance(name, str) or name not in usable:
        raise ConfigError(f"{where}: the job's kind must be one of {', '.join(usable)}, not {name!r}")
    return VERBS[name]


def jobs_of(recipe: dict[str, Any], path: Path) -> list[Job]:
    """Every job of a recipe with its request built (fields checked; files are checked when it runs)."""
    if "jobs" in recipe:
        return [_listed_job(table, path, i) for i, table in enumerate(_job_tables(recipe, path), start=1)]
    header = recipe.get("job")
    if header is None:
        if any(key in recipe for key in TRAIN_KEYS) or {"base", "data"} <= set(recipe):
            return [_train_on_itself(path)]
        raise ConfigError(f"{path}: no [job] table, no [[jobs]] and not a train config: nothing to run")
    if not isinstance(header, dict):
        raise ConfigError(f"{path}: [job] must be a table")
    unknown = sorted(set(header) - {"kind", "verb"})
    if unknown:
        raise ConfigError(f"{path} [job]: unknown keys {unknown}; known: ['kind', 'verb']")
    name = header.get("verb", header.get("kind"))
    verb = _verb(name, f"{path} [job]")
    if name == "train" and "train" not in recipe:
        return [_train_on_itself(path)]
    table = recipe.get(name, {})
    return [Job(verb, verb.request_from(table, f"{path} [{name}]"), f"{path} [{name}]")]


def _job_tables(recipe: dict[str, Any], path: Path) -> list[dict]:
    tables = recipe["jobs"]
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables) or not tables:
        raise ConfigError(f"{path}: jobs must be an array of tables ([[jobs]]), each with a verb")
    extra = sorted(set(recipe) - {"jobs"})
    if extra:
        raise ConfigError(f"{path}: with [[jobs]] every key belongs to a job; unexpected top-level keys {extra}")
    return tables


def _listed_job(table: dict[str, Any], path: Path, index: int) -> Job:
    where = f"{path} [[jobs]] #{index}"
    fields = dict(table)
    verb = _verb(fields.pop("verb", None), where)
    return Job(verb, verb.request_from(fields, f"{where} ({verb.name})"), where)


def _train_on_itself(path: Path) -> Job:
    from studio.verbs import VERBS

    verb = VERBS["train"]
    return Job(verb, verb.request_from({"config": str(path)}, str(path)), str(path))
