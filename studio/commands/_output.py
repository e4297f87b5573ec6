"""Shared CLI output: events drawn as a progress bar, tables, JSON."""

from __future__ import annotations

import json
import sys
from typing import Any, Iterable

from studio.events import Done, Message, Progress, Saved


def print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, default=str))


def print_table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip())


def drive(events: Iterable, quiet: bool = False) -> Any:
    """Consume a verb's events: a tqdm progress bar with loss, messages and saved files; return the result."""
    from tqdm import tqdm

    bar, stage = None, None
    result = None
    for event in events:
        if isinstance(event, Progress):
            if bar is None or bar.total != event.total or stage != event.stage:  # a new bar per stage
                stage = event.stage
                if bar is not None:
                    bar.close()
                bar = tqdm(total=event.total, desc=event.stage or "progress", disable=quiet, file=sys.stderr)
            bar.n = event.step
            if event.loss is not None:
                bar.set_postfix(loss=f"{event.loss:.4f}", refresh=False)
            bar.refresh()
        elif isinstance(event, Message):
            (bar.write if bar else print)(f"[{event.level}] {event.text}")
        elif isinstance(event, Saved) and not quiet:
            (bar.write if bar else print)(f"saved {event.path}")
        elif isinstance(event, Done):
            result = event.result
    if bar is not None:
        bar.close()
    return result
