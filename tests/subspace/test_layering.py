"""The subspace room's shape: no import circles, a pure-torch family module, one compress."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SUBSPACE = ROOT / "studio" / "subspace"


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at any depth (function-level imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def test_subspace_modules_import_no_circle():
    graph = {f"studio.subspace.{p.stem}": {m for m in _imports(p) if m.startswith("studio.subspace.")} for p in SUBSPACE.glob("*.py") if p.stem != "__init__"}
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for nxt in graph.get(module, ()):
            assert state.get(nxt) != "open", f"import circle: {' -> '.join(path + [nxt])}"
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[module] = "done"

    for module in graph:
        if module not in state:
            visit(module, [module])


def test_eigenlora_family_is_pure_torch():
    allowed = {"__future__", "math", "dataclasses", "typing", "torch", "studio.adapters.lora", "studio.adapters.base"}
    assert _imports(ROOT / "studio" / "adapters" / "eigenlora.py") <= allowed


def test_no_front_end_reaches_the_in_memory_oracle():
    users = [p for p in (ROOT / "studio").rglob("*.py") if p != SUBSPACE / "oracle.py" and "studio.subspace.oracle" in _imports(p)]
    assert users == []
    assert "oracle" not in (SUBSPACE / "__init__.py").read_text().split('"""')[-1]  # not exported either
