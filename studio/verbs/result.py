"""What a verb's result declares, so that the command line, `studio run` and the app render it
without probing it: JSON (``--json``, recipes), text (the terminal) and an exit code."""

from __future__ import annotations

import abc
from typing import Any


class VerbResult(abc.ABC):
    """A verb's result. ``exit_code`` is 0 unless the verb says a run failed in part (a refused file,
    a diverged training run)."""

    @abc.abstractmethod
    def as_json(self) -> Any:
        """Plain values for ``--json`` and recipes."""

    @abc.abstractmethod
    def as_text(self) -> str:
        """What the terminal shows."""

    @property
    def exit_code(self) -> int:
        return 0


def result_json(result: Any) -> Any:
    """A verb result's JSON; anything else (None, plain values) as it is."""
    return result.as_json() if isinstance(result, VerbResult) else result


def result_text(result: Any) -> str:
    return result.as_text() if isinstance(result, VerbResult) else ("" if result is None else str(result))


def exit_code_of(result: Any) -> int:
    return result.exit_code if isinstance(result, VerbResult) else 0
