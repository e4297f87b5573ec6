"""What the command line shows: events as tqdm bars and lines on stderr, results on stdout.

stdout holds only the result (its ``as_text()`` table, or with ``--json`` its ``as_json()`` and
nothing else); progress bars (one per stage), messages, saved files and ``warning:`` lines go to
stderr.
"""

from __future__ import annotations

import json
import sys
from typing import Any, Iterable

from studio.events import Done, Message, Progress, Saved
from studio.verbs.result import exit_code_of, result_json, result_text

SHOWN_METRICS = ("val_loss", "lr")


def one_line(text: Any) -> str:
    """A message on one line (a multi-line message joined with '; ', or ' ' after a colon)."""
    line = ""
    for part in (p.strip() for p in str(text).splitlines() if p.strip()):
        line += part if not line else (" " if line.endswith(":") else "; ") + part
    return line


class Bars:
    """One tqdm bar per stage of Progress events, on stderr."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.bar = None
        self.stage: str | None = None

    def progress(self, event: Progress) -> None:
        from tqdm import tqdm

        if self.bar is None or self.stage != event.stage or self.bar.total != event.total:
            self.close()
            self.stage = event.stage
            self.bar = tqdm(total=event.total, desc=event.stage or "progress", disable=self.quiet, file=sys.stderr, dynamic_ncols=True)
        self.bar.n = event.step
        postfix = {"loss": f"{event.loss:.4f}"} if event.loss is not None else {}
        postfix |= {k: f"{v:.4g}" for k, v in event.metrics.items() if k in SHOWN_METRICS}
        if postfix:
            self.bar.set_postfix(postfix, refresh=False)
        self.bar.refresh()

    def line(self, text: str) -> None:
        if self.bar is not None and not self.quiet:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def message_line(event: Message) -> str:
    return f"{event.level}: {one_line(event.text)}" if event.level != "info" else one_line(event.text)


def drive(events: Iterable, quiet: bool = False, silent: bool = False) -> Any:
    """Show a verb's events; return the result of its ``Done``. ``quiet``: no bars, no info or
    saved-file lines (warnings still); ``silent``: nothing at all (the other ranks of a
    multi-process run)."""
    if silent:
        return next((event.result for event in events if isinstance(event, Done)), None)
    bars = Bars(quiet)
    result = None
    try:
        for event in events:
            if isinstance(event, Progress):
                bars.progress(event)
            elif isinstance(event, Message) and (not quiet or event.level == "warning"):
                bars.line(message_line(event))
            elif isinstance(event, Saved) and not quiet and event.kind != "sample":
                bars.line(f"saved {event.kind + ': ' if event.kind else ''}{event.path}")
            elif isinstance(event, Done):
                result = event.result
    finally:
        bars.close()
    return result


def show_result(result: Any, as_json: bool) -> int:
    """Warnings on stderr, the result on stdout; the result's exit code (0 when it has none)."""
    for warning in getattr(result, "warnings", None) or []:
        print(f"warning: {one_line(warning)}", file=sys.stderr)
    if as_json:
        print(json.dumps(result_json(result), indent=2, default=str))
    elif result is not None:
        text = result_text(result)
        if text:
            print(text)
    return exit_code_of(result)
