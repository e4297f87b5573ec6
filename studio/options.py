"""Typed options: dataclass fields that carry their help text and bounds, checked in one place.

Every request of a verb, every train config and every family config is a dataclass whose fields
are declared with ``option(...)``. The metadata is what the CLI's ``--help``, the app's forms and
the recipes show, so all three say the same words and defaults; ``check(instance)`` validates
every field against its annotation and bounds and raises one ``ConfigError`` naming the field,
its value and what was expected (a string ``"5"`` is not an int, ``true`` is not a step count,
2.5 steps are refused rather than rounded).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import MISSING, Field, dataclass
from typing import Any, Literal, get_args, get_origin

from studio.errors import ConfigError

_NO_BOUND = None
SHOWN_CHARS = 80  # longest value repeated in an error message


@dataclass(frozen=True)
class Cli:
    """How the command line shows a field (`studio.cli.arguments` reads it from the metadata).

    ``positional``: a positional argument; ``repeat``: a list flag given once per value
    (``--adapter A --adapter B``) instead of several values after one flag; ``short``: a short flag
    (``-o``); ``flag``: replaces the long flag (``--for`` for ``tool``); ``metavar``: the value's
    name in the usage; ``required``: asked for on the command line although other front ends fill
    in a default (the app's output paths); ``one_of``: fields of one group are mutually exclusive
    and one is needed (``--k`` or ``--energy``)."""

    positional: bool = False
    repeat: bool = False
    short: str | None = None
    flag: str | None = None
    metavar: str | None = None
    required: bool = False
    one_of: str | None = None


def option(default: Any = MISSING, help: str = "", *, minimum: float | None = _NO_BOUND, maximum: float | None = _NO_BOUND,
           exclusive_minimum: bool = False, default_factory: Any = MISSING, cli: bool | Cli = True) -> Any:
    """A dataclass field with its help text and numeric bounds in the metadata.

    ``minimum`` / ``maximum`` bound numbers (and the length of nothing else); ``exclusive_minimum``
    makes the lower bound strict (learning rates > 0). ``cli=False`` keeps a field off the command
    line (values the front end fills in itself); a `Cli` says how the command line shows it."""
    shown = cli if isinstance(cli, Cli) else Cli()
    metadata = {"help": help, "minimum": minimum, "maximum": maximum, "exclusive_minimum": exclusive_minimum,
                "cli": cli is not False, **dataclasses.asdict(shown)}
    if default_factory is not MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def same_option(cls: type, name: str) -> Any:
    """A field declared as ``cls``'s field ``name`` is: the same default, help text and bounds, so
    a front end's form (the app's) says what the verb's request or config says."""
    source = next((item for item in dataclasses.fields(cls) if item.name == name), None)
    if source is None:
        raise TypeError(f"{cls.__name__} has no field {name!r}")
    if source.default_factory is not MISSING:  # type: ignore[misc]
        return dataclasses.field(default_factory=source.default_factory, metadata=source.metadata)  # type: ignore[misc]
    return dataclasses.field(default=source.default, metadata=source.metadata)


def help_of(item: Field) -> str:
    """The help text of a field ('' when it has none)."""
    return str(item.metadata.get("help", ""))


def default_of(item: Field) -> Any:
    """The field's default value (a fresh one for factories); MISSING when required."""
    if item.default is not MISSING:
        return item.default
    if item.default_factory is not MISSING:  # type: ignore[misc]
        return item.default_factory()  # type: ignore[misc]
    return MISSING


def field_types(cls: type) -> dict[str, Any]:
    """Resolved annotations of a dataclass (``from __future__ import annotations`` safe)."""
    return typing.get_type_hints(cls, include_extras=False)


def check(instance: Any, where: str = "") -> None:
    """Validate every field of a dataclass instance; raise ConfigError naming the first bad one.

    A field holding a dataclass (e.g. a request's ``limits``) is checked field by field too."""
    label = where or type(instance).__name__
    hints = field_types(type(instance))
    for item in dataclasses.fields(instance):
        value = getattr(instance, item.name)
        problem = _type_problem(value, hints[item.name]) or _bound_problem(value, item)
        if problem:
            raise ConfigError(f"{label}: {item.name} = {_shown(value)}: {problem}")
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            check(value, f"{label} {item.name}")


def _shown(value: Any) -> str:
    """A value as the message shows it (long texts and lists cut)."""
    text = repr(value)
    return text if len(text) <= SHOWN_CHARS else text[: SHOWN_CHARS - 3] + "..."


def from_table(cls: type, table: dict[str, Any], where: str) -> Any:
    """Build a dataclass from a TOML table / JSON object / form values, naming unknown or missing
    keys (fields without a default, and those the command line requires: a recipe's generate job
    names its output as the CLI does), then `check` it. Nested dataclass fields take a table of
    their own fields."""
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: expected a table of {cls.__name__} fields, got {type(table).__name__}")
    known = {item.name: item for item in dataclasses.fields(cls)}
    unknown = sorted(set(table) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown}; known: {sorted(known)}")
    missing = sorted(name for name, item in known.items()
                     if (default_of(item) is MISSING or item.metadata.get("required")) and name not in table)
    if missing:
        raise ConfigError(f"{where}: missing required keys {missing}")
    hints = field_types(cls)
    values = {}
    for name, value in table.items():
        nested = hints[name]
        values[name] = from_table(nested, value, f"{where} {name}") if dataclasses.is_dataclass(nested) and isinstance(value, dict) else value
    try:
        instance = cls(**values)
    except TypeError as error:
        raise ConfigError(f"{where}: {error}") from error
    check(instance, where)
    return instance


def _type_problem(value: Any, annotation: Any) -> str:
    """'' when value fits annotation, else what was expected."""
    origin, args = get_origin(annotation), get_args(annotation)
    if annotation is Any:
        return ""
    if origin is Literal:
        return "" if value in args else f"expected one of {', '.join(repr(a) for a in args)}"
    if origin in (typing.Union, types.UnionType):
        problems = [_type_problem(value, arg) for arg in args if arg is not type(None)]
        if value is None and type(None) in args or any(not p for p in problems):
            return ""
        return " or ".join(problems) + (" (or left out)" if type(None) in args else "")
    if annotation is type(None):
        return "" if value is None else "expected nothing (None)"
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return f"expected a list, got {type(value).__name__}"
        inner = args[0] if args else Any
        for element in value:
            problem = _type_problem(element, inner)
            if problem:
                return f"element {element!r}: {problem}"
        return ""
    if origin is dict:
        return "" if isinstance(value, dict) else f"expected a table, got {type(value).__name__}"
    return _scalar_problem(value, annotation)


def _scalar_problem(value: Any, annotation: Any) -> str:
    if annotation is bool:
        return "" if isinstance(value, bool) else f"expected true or false, got {type(value).__name__}"
    if annotation is int:
        return "" if isinstance(value, int) and not isinstance(value, bool) else f"expected a whole number, got {type(value).__name__}"
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"expected a number, got {type(value).__name__}"
        return "" if math.isfinite(value) else "expected a finite number"
    if annotation is str:
        return "" if isinstance(value, str) else f"expected text, got {type(value).__name__}"
    if isinstance(annotation, type) and not isinstance(value, annotation):
        return f"expected {annotation.__name__}, got {type(value).__name__}"
    return ""


def _bound_problem(value: Any, item: Field) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return ""
    low, high = item.metadata.get("minimum"), item.metadata.get("maximum")
    strict = item.metadata.get("exclusive_minimum", False)
    if low is not None and (value <= low if strict else value < low):
        return f"must be {'>' if strict else '>='} {_number(low)}"
    if high is not None and value > high:
        return f"must be <= {_number(high)}"
    return ""


def _number(bound: float) -> str:
    """A bound as written: whole numbers in full (a seed's 2**63 - 1 stays exact), others short."""
    return str(int(bound)) if float(bound).is_integer() else f"{bound:g}"


def describe(cls: type) -> list[dict[str, Any]]:
    """One entry per field: name, type text, default, help, bounds (for forms and docs)."""
    hints = field_types(cls)
    rows = []
    for item in dataclasses.fields(cls):
        default = default_of(item)
        rows.append({
            "name": item.name, "type": _type_text(hints[item.name]), "default": None if default is MISSING else default,
            "required": default is MISSING, "help": help_of(item), "minimum": item.metadata.get("minimum"),
            "maximum": item.metadata.get("maximum"), "choices": choices_of(hints[item.name]),
        })
    return rows


def _type_text(annotation: Any) -> str:
    origin = get_origin(annotation)
    if origin is Literal:
        return "choice"
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_text(a) for a in get_args(annotation))
    if origin in (list, tuple):
        return "list"
    return getattr(annotation, "__name__", str(annotation))


def choices_of(annotation: Any) -> list | None:
    """The values of a Literal annotation (also inside ``X | None``), else None."""
    if get_origin(annotation) is Literal:
        return list(get_args(annotation))
    if get_origin(annotation) in (typing.Union, types.UnionType):
        for arg in get_args(annotation):
            if get_origin(arg) is Literal:
                return list(get_args(arg))
    return None
