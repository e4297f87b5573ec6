"""Small glue between gradio and the services: studio errors become messages in the page.

Every handler the tabs register goes through `friendly`: an error the studio raises on purpose
(a `StudioError`: a bad path, a refused file, a bad config; the one error contract the command
line keeps too) is shown as a gradio error toast with its message (and returned as an error to
API clients). Anything else is a bug and keeps its stack trace.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable

import gradio as gr

from studio.errors import ConfigError, StudioError


def friendly(fn: Callable) -> Callable:
    """Wrap a handler (plain or generator) so expected errors reach the user as gr.Error."""
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def generator(*args: Any, **kwargs: Any):
            try:
                yield from fn(*args, **kwargs)
            except StudioError as error:
                raise gr.Error(str(error), print_exception=False) from error
        return generator

    @functools.wraps(fn)
    def plain(*args: Any, **kwargs: Any):
        try:
            return fn(*args, **kwargs)
        except StudioError as error:
            raise gr.Error(str(error), print_exception=False) from error
    return plain


def optional_int(value: Any) -> int | None:
    """A number box left empty (or 0) means 'the default'."""
    return int(value) if value not in (None, "", 0) else None


def optional_float(value: Any) -> float | None:
    """A number box left empty (or 0) means 'the default' (a CFG scale of 0 is never wanted)."""
    return float(value) if value not in (None, "", 0) else None


def float_list(text: str) -> list[float]:
    """'0.8, 1, 0.5' as numbers; a clear error for anything else."""
    try:
        return [float(part) for part in (text or "").replace(";", ",").split(",") if part.strip()]
    except ValueError as error:
        raise ConfigError(f"weights {text!r}: give numbers separated by commas") from error
