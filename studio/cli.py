"""The `studio` command line: one subcommand per module in `studio.commands`.

Each command module defines ``add_parser(subparsers)`` and ``run(args) -> int`` and calls the
same verb functions the web app calls; none holds logic of its own.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

import studio.commands
from studio.errors import StudioError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="studio", description="Adapter Studio: LoRA adapters on diffusers.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module_info in sorted(pkgutil.iter_modules(studio.commands.__path__), key=lambda m: m.name):
        if module_info.name.startswith("_"):
            continue
        module = importlib.import_module(f"studio.commands.{module_info.name}")
        sub = module.add_parser(subparsers)
        sub.set_defaults(handler=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except StudioError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
