"""`studio run RECIPE.toml`: run a declarative recipe from pipelines/."""

from __future__ import annotations

import argparse

from studio.commands._output import drive


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("run", help="run a recipe (pipelines/*.toml): world, compress, train, benchmark")
    parser.add_argument("recipe", help="recipe TOML file")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def run(args) -> int:
    from studio.recipes import run_recipe

    drive(run_recipe(args.recipe), quiet=args.quiet)
    return 0
