"""The generation verbs: plain functions returning results (the CLI and app call these).

``get_engine`` keeps one loaded Engine per (base, device, dtype) across calls, so the app and
repeated verb calls pay the pipeline load once.
"""

from __future__ import annotations

import threading

from studio.engine.engine import Engine, EngineConfig
from studio.engine.infotext import ImageParameters
from studio.engine.request import GeneratedImage, GenerateRequest

_ENGINES: dict[tuple, Engine] = {}
_ENGINES_LOCK = threading.Lock()


def get_engine(base: str = "world", device: str | None = None, dtype: str = "auto") -> Engine:
    """A loaded engine for BASE, created once and kept for later calls."""
    config = EngineConfig(device=device, dtype=dtype)
    key = (base, str(config.resolved_device()), str(config.resolved_dtype()))
    with _ENGINES_LOCK:
        if key not in _ENGINES:
            _ENGINES[key] = Engine.load(base, config)
        return _ENGINES[key]


def drop_engines() -> None:
    """Forget every kept engine (frees their memory once no caller holds them)."""
    with _ENGINES_LOCK:
        _ENGINES.clear()


def _engine_for(request: GenerateRequest, engine: Engine | None) -> Engine:
    return engine if engine is not None else get_engine(request.base, request.device, request.dtype)


def generate(request: GenerateRequest, engine: Engine | None = None, on_step=None) -> list[GeneratedImage]:
    """Generate ``request.batch`` images (or one per adapter with ``per_image``); ``on_step`` as in
    `Engine.run_jobs` (follow the denoising steps, interrupt them)."""
    return _engine_for(request, engine).generate(request, on_step)


def comparison_grid(request: GenerateRequest, engine: Engine | None = None, columns: int | None = None,
                    on_step=None) -> GeneratedImage:
    """One same-seed image per entry of ``request.adapters`` (one batch), as a labelled grid.

    Each entry is a SPEC or name (``none`` for the bare base); cells are labelled with the
    adapter names. The grid's PNG text is the shared parameters plus ``Grid: a | b | ...``.
    """
    from studio.engine.grid import labelled_grid
    from studio.errors import ConfigError

    if not request.adapters:
        raise ConfigError("a comparison grid needs at least one adapter (use 'none' for the bare base)")
    chosen = _engine_for(request, engine)
    cells = chosen.generate_per_image(request, request.adapters, [request.seed] * len(request.adapters), on_step)
    labels = [_cell_label(cell.parameters) for cell in cells]
    grid = labelled_grid([cell.image for cell in cells], labels, columns)
    first = cells[0].parameters
    params = ImageParameters(
        prompt=first.prompt, negative_prompt=first.negative_prompt, steps=first.steps, sampler=first.sampler,
        cfg_scale=first.cfg_scale, seed=first.seed, width=first.width, height=first.height, model=first.model,
        extra={**first.extra, "Grid": " | ".join(labels)},
    )
    return GeneratedImage(grid, params)


def _cell_label(parameters: ImageParameters) -> str:
    if not parameters.adapters:
        return "none"
    return " + ".join(name if weight == 1 else f"{name} {weight:g}" for name, weight in parameters.adapters)
