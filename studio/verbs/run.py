"""`studio run RECIPE.toml`: a declarative recipe of jobs, each naming a verb whose request is its
table (the same dataclass, defaults and checks as `studio VERB`). Formats: `studio.recipes`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

from studio.events import Done, Event, Message
from studio.options import check as check_fields
from studio.options import Cli, option
from studio.verbs import checks
from studio.verbs.result import VerbResult, exit_code_of, result_json, result_text


@dataclass
class RunRequest:
    """Which recipe."""

    recipe: str = option(help="recipe TOML file (pipelines/*.toml)", cli=Cli(positional=True, metavar="RECIPE.toml"))


@dataclass
class JobOutcome:
    """One job of a recipe: its verb and what it returned."""

    verb: str
    result: Any


@dataclass
class RunResult(VerbResult):
    """Every job's result, in order."""

    jobs: list[JobOutcome]

    @property
    def warnings(self) -> list[str]:
        return [w for job in self.jobs for w in getattr(job.result, "warnings", [])]

    @property
    def exit_code(self) -> int:
        return max((exit_code_of(job.result) for job in self.jobs), default=0)

    def as_json(self) -> list[dict]:
        return [{"verb": job.verb, "result": result_json(job.result)} for job in self.jobs]

    def as_text(self) -> str:
        return "\n\n".join(f"[{job.verb}]\n{result_text(job.result)}" for job in self.jobs)


def check(request: RunRequest) -> list:
    """The recipe reads, every job names a verb and its table builds that verb's request."""
    from studio.recipes import jobs_of, read_recipe

    check_fields(request, "run")
    path = checks.existing_file("recipe", request.recipe)
    return jobs_of(read_recipe(path), path)


def run(request: RunRequest) -> Iterator[Event]:
    """Each job in turn (its events passed on), then ``Done(RunResult)``. Every job's request is
    built first, so a bad table fails before the first job runs; files a job needs are checked
    when it starts (an earlier job may write them)."""
    jobs = check(request)
    outcomes = []
    for i, job in enumerate(jobs, start=1):
        if len(jobs) > 1:
            yield Message(f"job {i} of {len(jobs)}: {job.verb.name} ({job.where})")
        result = None
        for event in job.verb.events(job.request):
            if isinstance(event, Done):
                result = event.result
            else:
                yield event
        outcomes.append(JobOutcome(job.verb.name, result))
    yield Done(RunResult(outcomes))
