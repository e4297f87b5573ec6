"""`studio project COLLECTION.safetensors ADAPTER_FILE [--json]`: how well an unseen adapter fits."""

from __future__ import annotations

import argparse

from studio.commands._output import print_json, print_table


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("project", help="project a LoRA onto a compressed collection's components; report its error")
    parser.add_argument("collection", help="compressed collection .safetensors (from `studio compress`)")
    parser.add_argument("adapter", help="LoRA file to project")
    parser.add_argument("--base", default=None, help="BASE to map the LoRA's keys against")
    parser.add_argument("--json", action="store_true", help="print a JSON object")
    return parser


def run(args) -> int:
    from studio.formats import load_adapter
    from studio.subspace.collection import CompressedCollection
    from studio.subspace import project_adapter

    collection = CompressedCollection.load(args.collection)
    result = project_adapter(collection, load_adapter(args.adapter, args.base))
    if args.json:
        print_json(result.as_json())
        return 0
    print(f"{result.name}: relative error {result.rel_error:.3e} over {len(result.layer_errors)} layers")
    if result.uncovered_layers:
        print(f"{len(result.uncovered_layers)} layers have no components in the collection (counted as lost): {result.uncovered_layers[:5]}")
    worst = sorted(result.layer_errors.items(), key=lambda item: -item[1])[:5]
    print_table([[name, f"{error:.3e}"] for name, error in worst], ["worst layers", "rel error"])
    return 0
