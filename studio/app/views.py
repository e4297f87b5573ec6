"""Results as the tables and plot data the app shows (pandas frames, plain dicts; no gradio).

Kept apart from the wiring so that what a tab shows can be tested without a browser.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from studio.collection import AdapterInfo
from studio.events import Done, Event, Message, Progress, Sample, Saved

COLLECTION_COLUMNS = ["name", "format", "rank", "alpha", "layers", "targets", "size (KB)", "trigger words", "base", "status"]
ERROR_COLUMNS = ["adapter", "rel error", "bytes in", "loadings bytes"]


def typed_frame(rows: list[dict], columns: dict[str, str]) -> pd.DataFrame:
    """A frame with fixed column dtypes even when empty (a plot reads its axis types from them)."""
    frame = pd.DataFrame(rows, columns=list(columns))
    return frame.astype(columns)


def _short(value: Any) -> str:
    """A rank or alpha that may be one number or a list (mixed ranks)."""
    if isinstance(value, list):
        return f"{min(value):g}..{max(value):g}" if value else ""
    return f"{value:g}" if isinstance(value, (int, float)) else str(value)


def collection_table(infos: list[AdapterInfo]) -> pd.DataFrame:
    """One row per adapter file: what it is, what it targets, and whether it loaded."""
    rows = []
    for info in infos:
        targets = "; ".join(f"{component}: {', '.join(kinds)}" for component, kinds in info.targets.items())
        rows.append([
            info.name, info.format, _short(info.rank), _short(info.alpha), info.layers, targets, round(info.size / 1024, 1),
            ", ".join(info.trigger_words), info.base_guess, "error: " + info.error if info.error else "ok",
        ])
    return pd.DataFrame(rows, columns=COLLECTION_COLUMNS)


def collection_summary(infos: list[AdapterInfo], base: str) -> str:
    """A line saying how many adapters loaded and how many were refused (and why, first few)."""
    errors = [info for info in infos if info.error]
    text = f"**{len(infos) - len(errors)} adapters** loaded on base `{base}`"
    if errors:
        text += f"; **{len(errors)} refused**:\n" + "\n".join(f"- `{e.name}`: {e.error}" for e in errors[:10])
    return text


def adapter_details(info: AdapterInfo) -> dict[str, Any]:
    """Everything inspect knows of one adapter (metadata values already truncated by formats).

    The server-side path becomes the bare file name: clients see no server paths (and a
    ``path`` key would read as a file to download to gradio_client).
    """
    details = info.as_dict()
    details["file"] = Path(details.pop("path")).name
    return details


def error_table(result) -> pd.DataFrame:
    """Reconstruction error and sizes per adapter of a CompressResult."""
    rows = [[a.name, round(a.rel_error, 6), a.bytes_in, a.bytes_out] for a in result.adapters]
    return pd.DataFrame(rows, columns=ERROR_COLUMNS)


def explained_curve(result) -> pd.DataFrame:
    """Mean cumulative explained energy over layers, per component count, for down and up factors."""
    rows = []
    for side, index in (("down", 0), ("up", 1)):
        curves = [curve[index] for curve in result.explained.values() if curve[index]]
        longest = max((len(c) for c in curves), default=0)
        for k in range(longest):
            values = [c[k] for c in curves if k < len(c)]
            rows.append({"components": k + 1, "explained energy": sum(values) / len(values), "factor": side})
    return typed_frame(rows, {"components": "int64", "explained energy": "float64", "factor": "str"})


def compress_summary(outcome) -> dict[str, Any]:
    """The numbers an API client wants from a compression."""
    summary = outcome.as_json()  # the compress verb's result, warnings included (as `studio compress --json`)
    summary.pop("path", None)  # no server paths to clients
    summary["collection"] = outcome.path.name
    summary["exports"] = [path.name for path in outcome.exports]
    return summary


@dataclass
class TrainView:
    """What the Train tab shows, folded from the training events as they arrive."""

    total: int = 0
    step: int = 0
    losses: list[tuple[int, float]] = field(default_factory=list)
    validation: list[tuple[int, float]] = field(default_factory=list)
    samples: list[tuple[Any, str]] = field(default_factory=list)
    log: list[str] = field(default_factory=list)
    result: dict[str, Any] = field(default_factory=dict)

    def add(self, event: Event) -> None:
        """Fold one event in."""
        if isinstance(event, Progress):
            self.step, self.total = event.step, event.total
            if event.loss is not None:
                self.losses.append((event.step, float(event.loss)))
            if "val_loss" in event.metrics:
                self.validation.append((event.step, float(event.metrics["val_loss"])))
        elif isinstance(event, Sample):
            label = "base (no adapter)" if event.label == "base" else f"step {event.step}"
            self.samples.append((event.image, f"{label}: {event.prompt}"))
        elif isinstance(event, Message):
            self.log.append(f"[{event.level}] {event.text}")
        elif isinstance(event, Saved) and event.kind != "sample":
            self.log.append(f"saved {event.kind}: {event.path.name}")
        elif isinstance(event, Done):
            self.result = train_summary(event.result)

    def loss_frame(self) -> pd.DataFrame:
        rows = [{"step": s, "loss": v, "curve": "train"} for s, v in self.losses]
        rows += [{"step": s, "loss": v, "curve": "validation"} for s, v in self.validation]
        return typed_frame(rows, {"step": "int64", "loss": "float64", "curve": "str"})

    def status(self) -> str:
        head = f"step {self.step} / {self.total}" if self.total else "starting ..."
        if self.losses:
            head += f", loss {self.losses[-1][1]:.4f}"
        return head + "\n\n" + "\n".join(f"- {line}" for line in self.log[-8:])


def train_summary(result) -> dict[str, Any]:
    """A TrainResult as plain numbers and names."""
    return {
        "status": result.status, "steps": result.steps, "losses": {str(k): v for k, v in result.losses.items()},
        "validation": {str(k): v for k, v in result.validation.items()}, "parameters": result.parameters,
        "lora": result.lora_path.name if result.lora_path else None, "export_error": result.export_error,
    }


def progress_text(event: Progress) -> str:
    return f"{event.stage or 'progress'}: {event.step} / {event.total}"
