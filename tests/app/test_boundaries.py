"""Only studio/app imports gradio: every other module of the package stays usable without it."""

from __future__ import annotations

import re
from pathlib import Path

STUDIO = Path(__file__).resolve().parents[2] / "studio"
GRADIO_IMPORT = re.compile(r"^\s*(import\s+gradio\b|from\s+gradio\b)", re.MULTILINE)


def test_nothing_outside_the_app_imports_gradio():
    offenders = [
        str(path.relative_to(STUDIO.parent))
        for path in sorted(STUDIO.rglob("*.py"))
        if "app" not in path.relative_to(STUDIO).parts[:1] and GRADIO_IMPORT.search(path.read_text(encoding="utf-8"))
    ]
    assert offenders == [], f"gradio imported outside studio/app: {offenders}"


def test_the_check_sees_the_app_itself():
    """The pattern finds the imports that do exist (so an empty result above means something)."""
    app_files = [p for p in (STUDIO / "app").rglob("*.py") if GRADIO_IMPORT.search(p.read_text(encoding="utf-8"))]
    assert len(app_files) >= 5
