"""A family's knobs as form fields, from its config dataclass (`studio.options.describe`): each
field with its help text and range, numbers as numbers, choices as dropdowns, lists as
comma-separated text; the values become the run's ``[adapter]`` table (None left out: the
family's default)."""

from __future__ import annotations

from typing import Any

import gradio as gr

from studio.options import describe

NO_VALUE_TYPES = ("NoneType",)


def range_text(row: dict[str, Any]) -> str:
    """'(1..1024)', '(> 0)', '' from a field's bounds."""
    low, high = row["minimum"], row["maximum"]
    if low is None and high is None:
        return ""
    if high is None:
        return f" ({'> ' if row['type'] == 'float' and low == 0 else '>= '}{low:g})"
    return f" ({(low if low is not None else '-inf'):g}..{high:g})" if low is not None else f" (<= {high:g})"


def field_for(row: dict[str, Any], collections: list[str]) -> gr.components.Component:
    """One gradio field for one knob."""
    label, info = row["name"], (row["help"] + range_text(row)).strip()
    default, kind = row["default"], row["type"]
    if row["choices"]:
        return gr.Dropdown(row["choices"], value=default, label=label, info=info)
    if kind == "bool":
        return gr.Checkbox(value=bool(default), label=label, info=info)
    if kind.startswith("int"):
        return gr.Number(value=default, precision=0, label=label, info=info + (" (empty: the default)" if "None" in kind else ""))
    if kind.startswith("float"):
        return gr.Number(value=default, label=label, info=info)
    if kind == "list":
        return gr.Textbox(value=", ".join(default or ()), label=label, info=info + " (comma-separated)")
    if row["name"] == "collection":
        return gr.Dropdown(collections, value=collections[0] if collections else None, allow_custom_value=True, label=label, info=info)
    return gr.Textbox(value=default or "", label=label, info=info)


def knob_fields(config_class: type, collections: list[str]) -> dict[str, gr.components.Component]:
    """Every knob of a family as a field, by knob name."""
    return {row["name"]: field_for(row, collections) for row in describe(config_class)}


def knob_table(config_class: type, values: dict[str, Any]) -> dict[str, Any]:
    """The fields' values as the ``[adapter]`` table: lists split, integral numbers as ints, empty left out."""
    rows = {row["name"]: row for row in describe(config_class)}
    table = {}
    for name, value in values.items():
        row = rows[name]
        if value is None or (isinstance(value, str) and not value.strip() and row["type"] != "str"):
            continue
        if row["type"] == "list":
            value = [part.strip() for part in str(value).split(",") if part.strip()]
        elif row["type"].startswith("int") and isinstance(value, float) and value.is_integer():
            value = int(value)
        table[name] = value
    return table


def default_table(config_class: type, collections: list[str]) -> dict[str, Any]:
    """The family's defaults as a table (eigenlora: the workspace's latest compressed collection)."""
    values = {}
    for row in describe(config_class):
        default = row["default"]
        if row["name"] == "collection" and not default:
            default = collections[0] if collections else ""
        values[row["name"]] = ", ".join(default) if row["type"] == "list" else default
    return knob_table(config_class, values)


def field_values(config_class: type, collections: list[str]) -> list[Any]:
    """The fields' default values in describe order (to reset a family's fields)."""
    table = default_table(config_class, collections)
    out = []
    for row in describe(config_class):
        value = table.get(row["name"])
        out.append(", ".join(value) if row["type"] == "list" and value is not None else value)
    return out
