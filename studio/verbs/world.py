"""The world build as a recipe job (``[job] kind = "world"`` with a ``[world]`` table): the data,
VAE, base pipeline and style zoo of the embedded world (`studio.world.build.build_world`).

Its request is the world room's own `studio.world.config.WorldConfig` (the ``[world]`` table,
checked by `config_from_dict`); there is no `studio world` command: run `studio run
pipelines/world.toml`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator

from studio.events import Event


def from_table(table: dict[str, Any], where: str) -> Any:
    """A ``[world]`` table as a checked WorldConfig."""
    from studio.world.config import config_from_dict

    return config_from_dict(table, where)


def check(config: Any) -> None:
    """Every field of a WorldConfig (the same checks as reading it from a recipe)."""
    from_table(dataclasses.asdict(config), "world")


def run(config: Any) -> Iterator[Event]:
    """Build the world in resumable stages, as events."""
    from studio.world.build import build_world

    check(config)
    yield from build_world(config)
