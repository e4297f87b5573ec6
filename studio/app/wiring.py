"""Small glue between gradio and the services: forms in, studio errors out as messages.

A tab's components are named after its form's fields (`studio.app.forms`) and passed to gradio
as ``inputs_kwargs``, so an API client calls ``/generate`` with ``prompt=..., seed=...`` and the
callback receives ONE form object (`form_of`: gradio's values converted to the field types, then
checked by `studio.options` with the same messages as the CLI). Every handler goes through
`friendly`: an error the studio raises on purpose (a `StudioError`; the one error contract the
command line keeps too) is shown as a gradio error toast with exactly the CLI's one-line text
(and returned as an error to API clients). Anything else is a bug and keeps its stack trace.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import types
import typing
from typing import Any, Callable, get_args, get_origin

import gradio as gr

from studio.errors import ConfigError, StudioError
from studio.options import field_types, from_table


def friendly(fn: Callable) -> Callable:
    """Wrap a handler (plain or generator) so expected errors reach the user as gr.Error."""
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def generator(*args: Any, **kwargs: Any):
            try:
                yield from fn(*args, **kwargs)
            except StudioError as error:
                raise gr.Error(str(error), print_exception=False) from error
        return generator

    @functools.wraps(fn)
    def plain(*args: Any, **kwargs: Any):
        try:
            return fn(*args, **kwargs)
        except StudioError as error:
            raise gr.Error(str(error), print_exception=False) from error
    return plain


def form_of(cls: type, values: dict[str, Any], where: str) -> Any:
    """The form ``cls`` from a callback's keyword values (gradio's types converted, then checked)."""
    hints = field_types(cls)
    known = {item.name for item in dataclasses.fields(cls)}
    table = {name: _convert(value, hints[name], name, where) for name, value in values.items() if name in known}
    return from_table(cls, table, where)


def _convert(value: Any, annotation: Any, name: str, where: str) -> Any:
    """A component's value as the field's type: integral floats as ints, None as empty, JSON text as a table."""
    origin, args = get_origin(annotation), get_args(annotation)
    optional = origin in (typing.Union, types.UnionType) and type(None) in args
    if optional and value in (None, ""):
        return None
    inner = next((a for a in args if a is not type(None)), annotation) if optional else annotation
    if inner is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if inner is str and value is None:
        return ""
    if get_origin(inner) is list and value is None:
        return []
    if get_origin(inner) is list and isinstance(value, str):
        return [value] if value else []
    if get_origin(inner) is dict and isinstance(value, str):
        try:
            return json.loads(value or "{}")
        except json.JSONDecodeError as error:
            raise ConfigError(f"{where}: {name}: not valid JSON ({error})") from error
    if get_origin(inner) is dict and value is None:
        return {}
    return value


def takes(cls: type, where: str) -> Callable[[Callable], Callable]:
    """Decorator: ``fn(form)`` becomes a gradio callback of the form's fields as keyword arguments."""
    def wrap(fn: Callable) -> Callable:
        if inspect.isgeneratorfunction(fn):
            def call(**values: Any):
                yield from fn(form_of(cls, values, where))
        else:
            def call(**values: Any):
                return fn(form_of(cls, values, where))
        call.__name__ = fn.__name__
        return friendly(call)
    return wrap


def named(cls: type, **components: Any) -> dict[str, Any]:
    """``inputs_kwargs`` for a form: every field gets a component (so the API names match the form)."""
    fields = [item.name for item in dataclasses.fields(cls)]
    missing, extra = set(fields) - set(components), set(components) - set(fields)
    if missing or extra:
        raise ValueError(f"{cls.__name__}: components missing for {sorted(missing)}, unknown {sorted(extra)}")
    _check_initial_values(cls, components)
    return {name: components[name] for name in fields}


def _check_initial_values(cls: type, components: dict[str, Any]) -> None:
    """A component starts at its form field's default (the verb's, for fields declared with
    ``same_option``): a number typed into the page must not differ from what --help prints."""
    from studio.options import default_of

    for item in dataclasses.fields(cls):
        default, shown = default_of(item), getattr(components[item.name], "value", None)
        if default is dataclasses.MISSING or default is None or shown is None or callable(shown) or isinstance(default, dict):
            continue  # dict fields (a family's knobs) start at what the chosen family declares
        if isinstance(default, (int, float)) and not isinstance(default, bool) and default == 0 and shown:
            continue  # 0 = "the family's / base's own": the component shows that value, resolved
        if isinstance(default, tuple):
            default = list(default)
        if shown != default:
            raise ValueError(f"{cls.__name__}.{item.name}: the component starts at {shown!r}, the form's default is {default!r}")


def hint(cls: type, name: str) -> str:
    """A form field's help text, shown under its component (the words --help prints for the
    same field of the verb's request)."""
    from studio.options import help_of

    return help_of(next(item for item in dataclasses.fields(cls) if item.name == name))
