"""The `studio` command line: one subcommand per verb of `studio.verbs.VERBS`.

Each subcommand's arguments are built from its verb's request dataclass (`arguments`); the
parsed arguments become that request, the verb runs, and `render` shows its events and result.
Nothing here holds logic of a verb.

The error contract: a `StudioError` (every failure a user can cause, bad arguments included)
prints as one line ``error: <message>`` on stderr and exits with 2; Ctrl-C exits with 130 (a
training run's first Ctrl-C stops it at the next step with a checkpoint saved); anything else is
a bug and shows its traceback. ``studio --help`` and ``studio VERB --help`` import no torch.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import warnings
from typing import Any

from studio.cli import arguments, render
from studio.errors import StudioError
from studio.verbs import VERBS, Verb, distributed
from studio.verbs.result import exit_code_of

USAGE_EXIT = 2
INTERRUPTED_EXIT = 130


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command-line verb (request fields as arguments)."""
    parser = arguments.Parser(prog="studio", description="Adapter Studio: LoRA adapters on diffusers.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="VERB", parser_class=arguments.Parser)
    for verb in VERBS.values():
        if not verb.cli:
            continue
        sub = subparsers.add_parser(verb.name, help=verb.summary, description=verb.description,
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
        arguments.add_request(sub, verb.request)
        if verb.overrides is not None:
            arguments.add_overrides(sub, verb.overrides, "config overrides")
        sub.add_argument("--json", action="store_true", dest="cli__json", help="print the result as JSON on stdout (nothing else there)")
        sub.add_argument("--quiet", action="store_true", dest="cli__quiet", help="no progress bars or info lines (warnings still)")
        sub.set_defaults(cli__verb=verb.name)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command line; the exit code."""
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _warning_line
            return _main(argv)
    except StudioError as error:
        print(f"error: {render.one_line(error)}", file=sys.stderr)
        return USAGE_EXIT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return INTERRUPTED_EXIT


def _main(argv: list[str] | None) -> int:
    namespace = build_parser().parse_args(argv)
    verb = VERBS[namespace.cli__verb]
    options = {key: vars(namespace).pop(key) for key in ("cli__verb", "cli__json", "cli__quiet", "command")}
    request = arguments.request_of(verb.request, namespace)
    main_process = distributed.is_main_process()
    with _stop_on_interrupt(verb) as stop:
        result = render.drive(verb.events(request, stop), quiet=options["cli__quiet"], silent=not main_process)
    if not main_process:
        return exit_code_of(result)
    return render.show_result(result, options["cli__json"])


class _stop_on_interrupt:
    """For a stoppable verb (train): the first Ctrl-C sets its stop flag (it finishes the step and
    saves a checkpoint), a second one interrupts. Other verbs: Ctrl-C interrupts at once."""

    def __init__(self, verb: Verb) -> None:
        self.verb = verb
        self.stop = threading.Event() if verb.stoppable else None
        self.previous: Any = None

    def __enter__(self) -> threading.Event | None:
        if self.stop is not None and threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._interrupt)
        return self.stop

    def _interrupt(self, signum, frame) -> None:
        if self.stop.is_set():
            raise KeyboardInterrupt
        self.stop.set()
        print("\nstopping after this step (a checkpoint is saved); Ctrl-C again to interrupt", file=sys.stderr)

    def __exit__(self, *exc) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def _warning_line(message, category, filename, lineno, file=None, line=None) -> None:
    """Python warnings (e.g. a clamped K) as one ``warning:`` line on stderr."""
    print(f"warning: {render.one_line(message)}", file=sys.stderr)
