"""The studio's verbs: one module per verb, one typed request each, all listed in `VERBS`.

| verb | module | what it does |
|---|---|---|
| inspect | `studio/verbs/inspect.py` | what each adapter file holds (format, rank, alpha, layers, targets, base) |
| export | `studio/verbs/export.py` | a LoRA (or a collection member) in the kohya / diffusers layout or for one tool |
| compress | `studio/verbs/compress.py` | LoRAs into an EigenLoRAx collection, with its report (the streaming compress) |
| project | `studio/verbs/project.py` | how well an unseen LoRA fits a collection's components |
| similar | `studio/verbs/similar.py` | the adapters closest to one LoRA in weight space |
| dataset | `studio/verbs/dataset.py` | a world style's images and captions as a training folder |
| train | `studio/verbs/train.py` | one training loop for every family (CONFIG.toml, field overrides, resume) |
| generate | `studio/verbs/generate.py` | images with adapters (merged, mixed, per image, grids); size caps, memory estimate |
| run | `studio/verbs/run.py` | a recipe of jobs (`studio/recipes.py` reads the file) |
| serve | `studio/verbs/serve.py` | the web app (`studio/app/`) |
| world, benchmark | `studio/verbs/world.py`, `benchmark.py` | recipe jobs only: build the embedded world, run a benchmark script |

Each module defines its request dataclass (fields declared with `studio.options.option`: help
text, default, bounds, how the command line shows it), ``check(request)`` (every field: types,
ranges, files that must exist, outputs that must not replace an input; a `StudioError` naming the
field or file), and ``run(request)``, which checks first and returns a result (``as_json()``,
``as_text()``, ``warnings``) or yields `studio.events` ending in ``Done(result)``. The command line
(`studio/cli/`), the app (`studio/app/services.py`) and recipes only build requests and show what
comes back. Modules import torch only inside functions, so ``studio --help`` answers at once.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable, Iterator

from studio.errors import ConfigError
from studio.events import Done, Event
from studio.options import from_table
from studio.verbs import benchmark, compress, dataset, export, generate, inspect, project, run, serve, similar, train, world


@dataclass(frozen=True)
class Verb:
    """One verb: its request class, its check and function, and how front ends may call it.

    ``streams``: ``run`` yields events; ``stoppable``: ``run`` takes ``stop`` (a threading.Event);
    ``overrides``: a dataclass whose fields are also accepted (collected into
    ``request.overrides``: train's TrainConfig fields); ``table``: how a recipe table becomes the
    request when it is not the request class's own fields (the world's WorldConfig)."""

    name: str
    module: ModuleType
    request: type | None
    summary: str
    streams: bool = False
    stoppable: bool = False
    cli: bool = True
    recipe: bool = True
    overrides: type | None = None
    table: Callable[[dict, str], Any] | None = None

    @property
    def run(self) -> Callable:
        return self.module.run

    @property
    def check(self) -> Callable:
        return self.module.check

    @property
    def description(self) -> str:
        return self.module.__doc__ or self.summary

    def request_from(self, table: dict[str, Any], where: str) -> Any:
        """A recipe table (or JSON object) as this verb's request, its fields checked."""
        if self.table is not None:
            return self.table(table, where)
        if self.overrides is None:
            return from_table(self.request, table, where)
        own, overridable = set(self.request.__dataclass_fields__), set(self.overrides.__dataclass_fields__)
        values = {k: v for k, v in table.items() if k in own}
        values["overrides"] = {**values.get("overrides", {}), **{k: v for k, v in table.items() if k not in own}}
        unknown = sorted(set(values["overrides"]) - overridable)
        if unknown:
            raise ConfigError(f"{where}: unknown keys {unknown}; known: {sorted((own | overridable) - {'overrides'})}")
        return from_table(self.request, values, where)

    def events(self, request: Any, stop: threading.Event | None = None) -> Iterator[Event]:
        """The verb's events, ending in ``Done(result)`` (a plain result is wrapped)."""
        outcome = self.run(request, stop=stop) if self.stoppable else self.run(request)
        if self.streams:
            yield from outcome
        else:
            yield Done(outcome)


VERBS: dict[str, Verb] = {
    "inspect": Verb("inspect", inspect, inspect.InspectRequest, "report format, rank, alpha, layers, targets and base of LoRA files"),
    "export": Verb("export", export, export.ExportRequest, "write a LoRA (or a collection member) in the kohya / diffusers layout, or for one tool"),
    "compress": Verb("compress", compress, compress.CompressRequest, "compress LoRAs into shared EigenLoRAx components + per-adapter loadings",
                     streams=True),
    "project": Verb("project", project, project.ProjectRequest, "project a LoRA onto a compressed collection's components; report its error"),
    "similar": Verb("similar", similar, similar.SimilarRequest, "rank a collection's adapters by closeness in weight space to one LoRA"),
    "dataset": Verb("dataset", dataset, dataset.DatasetRequest, "render a world style's images and captions as a training folder"),
    "train": Verb("train", train, train.TrainRequest, "train an adapter (lora, eigenlora, superlora, unilora) on images + captions",
                  streams=True, stoppable=True, overrides=train.TrainConfig),
    "generate": Verb("generate", generate, generate.GenerateRequest, "generate images with adapters (merged, mixed, per image, grid)"),
    "run": Verb("run", run, run.RunRequest, "run a recipe (pipelines/*.toml): jobs of verbs", streams=True, recipe=False),
    "serve": Verb("serve", serve, serve.ServeRequest, "the web app (Gradio) on 127.0.0.1", streams=True, recipe=False),
    "world": Verb("world", world, None, "build the embedded world (data, VAE, base, zoo)", streams=True, cli=False, table=world.from_table),
    "benchmark": Verb("benchmark", benchmark, benchmark.BenchmarkRequest, "run a benchmark script", cli=False),
}

__all__ = ["VERBS", "Verb"]
