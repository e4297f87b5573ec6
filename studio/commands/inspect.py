"""`studio inspect PATH... [--base BASE] [--json]`: what each adapter file holds."""

from __future__ import annotations

import argparse

from studio.commands._output import print_json, print_table
from studio.verbs import inspect


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("inspect", help="report format, rank, alpha, layers, targets, base of LoRA files")
    parser.add_argument("paths", nargs="+", help="LoRA files or folders of them")
    parser.add_argument("--base", default=None, help="check against BASE (world, sd15, sd2, sdxl, folder, file, hub id)")
    parser.add_argument("--json", action="store_true", help="print a JSON list")
    return parser


def _short(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def run(args) -> int:
    infos = inspect(args.paths, base=args.base)
    if args.json:
        print_json([info.as_dict() for info in infos])
    else:
        rows = []
        for info in infos:
            if info.error:
                rows.append([info.name, "ERROR", "", "", "", "", "", info.error])
                continue
            targets = "; ".join(f"{c}: {len(k)} kinds" for c, k in info.targets.items())
            rows.append([info.name, info.format, _short(info.rank), _short(info.alpha), str(info.layers), info.base_guess,
                         f"{info.size / 1e6:.1f} MB", ", ".join(info.trigger_words) or targets])
            for note in info.notes:
                rows.append(["", "note", "", "", "", "", "", note])
        print_table(rows, ["name", "format", "rank", "alpha", "layers", "base", "size", "trigger words / targets"])
    return 1 if infos and all(info.error for info in infos) else 0
