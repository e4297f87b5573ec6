"""Each subcommand's arguments, built from its verb's request dataclass (and back).

Flags are the field names (``lycoris_rank`` -> ``--lycoris-rank``); the help text, default and
bounds come from the field's `studio.options.option` metadata, choices from ``Literal`` types.
A nested dataclass field (generate's ``limits``) adds its fields as flags of their own group;
a verb's ``overrides`` class (train's TrainConfig) adds one flag per field, collected into
``request.overrides``. Values the user leaves out keep the request's own defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import MISSING, Field
from typing import Any, Literal, get_args, get_origin

from studio.errors import UsageError
from studio.options import choices_of, default_of, field_types, help_of

NESTED = "__"  # dest separator of a nested dataclass's flags (limits__max_pixels)
OVERRIDE = "override__"  # dest prefix of an overrides flag


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one-line `UsageError`s (the CLI's one error contract)."""

    def error(self, message: str) -> typing.NoReturn:
        raise UsageError(f"{self.prog}: {message}")


def _plain(annotation: Any) -> Any:
    """``X | None`` -> X (other annotations unchanged)."""
    if get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        return args[0] if len(args) == 1 else annotation
    return annotation


def _converter(annotation: Any):
    """The argparse ``type`` of a scalar annotation."""
    annotation = _plain(annotation)
    if get_origin(annotation) is Literal:
        return type(get_args(annotation)[0])
    return annotation if annotation in (int, float, str) else str


def _bounds(item: Field) -> str:
    low, high = item.metadata.get("minimum"), item.metadata.get("maximum")
    strict = ">" if item.metadata.get("exclusive_minimum") else ">="
    if low is not None and high is not None:
        return f"{_number(low)} {'<' if strict == '>' else '<='} value <= {_number(high)}"
    if low is not None:
        return f"{strict} {_number(low)}"
    return f"<= {_number(high)}" if high is not None else ""


def _number(value: float) -> str:
    """A bound as written: whole numbers in full (2**63 - 1 stays exact), others short."""
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def help_text(item: Field, note: str = "") -> str:
    """The field's help with its bounds and default, escaped for argparse."""
    parts = [help_of(item)]
    bounds = _bounds(item)
    default = default_of(item)
    extra = [bounds] if bounds else []
    if note:
        extra.append(note)
    elif default not in (MISSING, None, "", False, []) and not dataclasses.is_dataclass(default):
        extra.append(f"default: {default}")
    text = parts[0] + (f" ({'; '.join(extra)})" if extra else "")
    return text.replace("%", "%%")


def flag_of(item: Field) -> str:
    return item.metadata.get("flag") or "--" + item.name.replace("_", "-")


def add_request(parser: argparse.ArgumentParser, cls: type) -> None:
    """One argument per command-line field of ``cls``."""
    hints = field_types(cls)
    groups: dict[str, argparse._MutuallyExclusiveGroup] = {}
    for item in dataclasses.fields(cls):
        if not item.metadata.get("cli", True):
            continue
        annotation = hints[item.name]
        if dataclasses.is_dataclass(annotation):
            group = parser.add_argument_group(f"{item.name}", help_of(item))
            for inner in dataclasses.fields(annotation):
                _add_field(group, inner, field_types(annotation)[inner.name], f"{item.name}{NESTED}{inner.name}")
            continue
        target = parser
        if item.metadata.get("one_of"):
            name = item.metadata["one_of"]
            if name not in groups:
                groups[name] = parser.add_mutually_exclusive_group(required=True)
            target = groups[name]
        _add_field(target, item, annotation, item.name)


def add_overrides(parser: argparse.ArgumentParser, cls: type, title: str) -> None:
    """One optional flag per field of ``cls`` (scalars, choices, lists), collected into overrides."""
    group = parser.add_argument_group(title, f"each replaces the field of the same name in the config ({cls.__name__})")
    hints = field_types(cls)
    for item in dataclasses.fields(cls):
        if item.metadata.get("cli", True) and get_origin(hints[item.name]) is not dict:
            _add_field(group, item, hints[item.name], OVERRIDE + item.name, override=True)


def _add_field(target, item: Field, annotation: Any, dest: str, override: bool = False) -> None:
    meta = item.metadata
    plain = _plain(annotation)
    default = default_of(item)
    required = not override and (meta.get("required") or default is MISSING)
    note = "replaces the config's value" if override else ""
    kwargs: dict[str, Any] = {"help": help_text(item, note)}
    choices = choices_of(annotation)
    if choices is not None:
        kwargs["choices"] = choices
    elif plain is not bool:
        kwargs["metavar"] = meta.get("metavar") or item.name.upper()
    if get_origin(plain) in (list, tuple):
        inner = get_args(plain)[0] if get_args(plain) else str
        kwargs["type"] = _converter(inner)
        if meta.get("positional") and not override:
            target.add_argument(dest, nargs="+" if required else "*", **kwargs)
            return
        kwargs.update(action="append") if meta.get("repeat") else kwargs.update(nargs="+")
    elif plain is bool:
        kwargs["action"] = argparse.BooleanOptionalAction if (override or default is True) else "store_true"
    else:
        kwargs["type"] = _converter(plain)
    if meta.get("positional") and not override:
        target.add_argument(dest, **kwargs)
        return
    names = [meta["short"]] if meta.get("short") and not override else []
    names.append(flag_of(item))
    target.add_argument(*names, dest=dest, default=argparse.SUPPRESS, required=bool(required), **kwargs)


def request_of(cls: type, namespace: argparse.Namespace) -> Any:
    """The request the parsed arguments describe (left-out fields keep their defaults)."""
    given = vars(namespace)
    hints = field_types(cls)
    values: dict[str, Any] = {}
    overrides = {key[len(OVERRIDE):]: value for key, value in given.items() if key.startswith(OVERRIDE)}
    for item in dataclasses.fields(cls):
        annotation = hints[item.name]
        if dataclasses.is_dataclass(annotation):
            prefix = item.name + NESTED
            nested = {key[len(prefix):]: value for key, value in given.items() if key.startswith(prefix)}
            values[item.name] = dataclasses.replace(default_of(item), **nested)
        elif item.name in given:
            values[item.name] = given[item.name]
    if overrides:
        values["overrides"] = overrides
    return cls(**values)
