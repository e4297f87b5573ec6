"""`studio export IN -o OUT --format kohya|diffusers [--adapter NAME] [--base BASE]`."""

from __future__ import annotations

import argparse

from studio.verbs import export


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("export", help="convert a LoRA file (or one adapter of a compressed collection)")
    parser.add_argument("input", help="a LoRA file, or a compressed collection with --adapter")
    parser.add_argument("-o", "--output", required=True, help="output .safetensors path")
    parser.add_argument("--format", choices=["kohya", "diffusers"], default="kohya")
    parser.add_argument("--for", dest="tool", choices=["kohya", "comfyui", "a1111", "diffusers"], default=None,
                        help="write the layout this tool reads exactly (instead of --format) and check it with the tool's key rules")
    parser.add_argument("--adapter", default=None, help="adapter name inside a compressed collection")
    parser.add_argument("--base", default=None, help="BASE to validate / map keys against")
    parser.add_argument("--lycoris-rank", type=int, default=None,
                        help="rank for LoHa/LoKr conversion (default: per layer, the smallest rank reaching 1%% relative error)")
    return parser


def run(args) -> int:
    path, notes = export(args.input, args.output, format=args.format, adapter=args.adapter, base=args.base,
                         lycoris_rank=args.lycoris_rank, tool=args.tool)
    for note in notes:
        print(f"note: {note}")
    print(f"wrote {path} ({f'for {args.tool}' if args.tool else args.format})")
    return 0
