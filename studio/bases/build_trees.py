"""Regenerate the stored module trees: ``python -m studio.bases.build_trees [ARCH ...]``.

Each tree is built from the bundled config (``studio/configs/<arch>.json``) as real diffusers /
transformers modules on the meta device and written to ``studio/bases/trees/<arch>.json``. Run it
after a diffusers or transformers upgrade; ``tests/bases/test_trees.py`` checks that the stored
trees equal freshly built ones.
"""

from __future__ import annotations

import argparse
import time

from studio.bases import ARCHITECTURES
from studio.bases.meta import build_architecture_tree
from studio.bases.trees import TREE_DIR, tree_to_json, write_json_atomic


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("arches", nargs="*", default=list(ARCHITECTURES), help="architectures to rebuild (default: all)")
    args = parser.parse_args(argv)
    for arch in args.arches:
        start = time.perf_counter()
        tree = build_architecture_tree(arch)
        write_json_atomic(TREE_DIR / f"{arch}.json", tree_to_json(tree))
        print(f"{arch}: {len(tree.modules)} modules, components {tree.components} ({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
