"""A benchmark script as a recipe job (``[job] kind = "benchmark"``): run with this Python; the
script prints its own table. A script that fails is an error naming it and its exit code."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field

from studio.errors import StudioError
from studio.options import check as check_fields
from studio.options import Cli, option
from studio.verbs import checks
from studio.verbs.result import VerbResult


@dataclass
class BenchmarkRequest:
    """Which script, with which arguments."""

    script: str = option(help="the benchmark script (benchmarks/*.py)", cli=Cli(positional=True))
    args: list[str] = option(default_factory=list, help="arguments passed to the script")


@dataclass
class BenchmarkResult(VerbResult):
    """The script that ran and its exit code (0)."""

    script: str
    returncode: int
    warnings: list[str] = field(default_factory=list)

    def as_json(self) -> dict:
        return {"script": self.script, "returncode": self.returncode}

    def as_text(self) -> str:
        return f"{self.script}: done"


def check(request: BenchmarkRequest) -> None:
    check_fields(request, "benchmark")
    checks.existing_file("script", request.script)


def run(request: BenchmarkRequest) -> BenchmarkResult:
    """Run the script; its output goes to this process's stdout and stderr."""
    check(request)
    completed = subprocess.run([sys.executable, request.script, *request.args], check=False)
    if completed.returncode:
        raise StudioError(f"benchmark {request.script} exited with {completed.returncode}")
    return BenchmarkResult(request.script, completed.returncode)
