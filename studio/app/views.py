"""Results as the tables, texts and plot data the app shows (pandas frames, plain dicts; no gradio).

Kept apart from the wiring so that what a tab shows can be tested without a browser.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from studio.app.library import Entry
from studio.events import Done, Event, Message, Progress, Sample, Saved

COLLECTION_COLUMNS = ["name", "kind", "base", "rank", "trigger words", "status"]
ERROR_COLUMNS = ["adapter", "in-sample", "LOO", "mean", "random", "SVD same bytes", "bytes in", "loadings bytes"]
DUPLICATE_COLUMNS = ["first", "second", "cosine", "rel distance", "kind"]
HIGH_ERROR = 0.5  # leave-one-out / in-sample error above which the tab warns (as the compress verb does)
FAITHFUL = 0.01
STATUS_CHARS = 60


def typed_frame(rows: list[dict], columns: dict[str, str]) -> pd.DataFrame:
    """A frame with fixed column dtypes even when empty (a plot reads its axis types from them)."""
    frame = pd.DataFrame(rows, columns=list(columns))
    return frame.astype(columns)


def _short(value: Any) -> str:
    """A rank or alpha that may be one number or a list (mixed ranks)."""
    if isinstance(value, list):
        return f"{min(value):g}..{max(value):g}" if value else ""
    return f"{value:g}" if isinstance(value, (int, float)) and value else ""


def _status(entry: Entry) -> str:
    if entry.ok:
        warned = [n for n in entry.info.notes if n.startswith("warning: ")]
        return "ok" + (" (warning)" if warned else "")
    error = entry.info.error or "refused"
    return "refused: " + (error if len(error) <= STATUS_CHARS else error[: STATUS_CHARS - 3] + "...")


def collection_table(entries: list[Entry], query: str = "") -> pd.DataFrame:
    """One compact row per adapter (name, kind, base, rank, trigger words, status), filtered by ``query``."""
    rows = []
    words = [w for w in query.lower().split() if w]
    for entry in entries:
        info = entry.info
        row = [info.name, entry.kind, info.base_guess, _short(info.rank), ", ".join(info.trigger_words[:3]), _status(entry)]
        text = " ".join(str(cell) for cell in row).lower() + " " + info.format.lower()
        if all(word in text for word in words):
            rows.append(row)
    return pd.DataFrame(rows, columns=COLLECTION_COLUMNS)


def collection_summary(entries: list[Entry], base: str, lines: list[str] | None = None) -> str:
    """How many adapters loaded and how many were refused, then what the last action said."""
    ok = sum(1 for e in entries if e.ok)
    refused = len(entries) - ok
    text = f"**{ok} adapters** loaded on base `{base}`" + (f"; **{refused} refused** (pick one for its reason)" if refused else "")
    if lines:
        text += "\n\n" + "\n".join(f"- {line}" for line in lines[-12:])
    return text


def entry_details(entry: Entry) -> dict[str, Any]:
    """Everything inspect knows of one adapter, refused files included (their header's metadata too).

    The server-side path becomes the bare file name: clients see no server paths.
    """
    details = entry.info.as_dict()
    details["file"] = Path(details.pop("path")).name
    details["kind"] = entry.kind
    if not details["metadata"] and entry.source is not None:
        details["metadata"] = header_metadata(entry.source)
    return details


def header_metadata(path: Path) -> dict[str, str]:
    """A file's header metadata as inspect shows it (values cut), or {} when it cannot be read."""
    from studio.errors import StudioError
    from studio.formats import read_header, shown_metadata

    try:
        return shown_metadata(read_header(path)[1]) if path.suffix == ".safetensors" else {}
    except (StudioError, OSError):
        return {}


def number(value: Any, digits: int = 3) -> Any:
    """A number rounded for a table (None and NaN stay empty)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return round(float(value), digits)


def error_table(summary: dict[str, Any] | None) -> pd.DataFrame:
    """Per adapter: in-sample and leave-one-out errors beside the mean / random / SVD baselines."""
    rows = []
    for a in (summary or {}).get("adapters", []):
        rows.append([a["name"], number(a.get("rel_error"), 4), number(a.get("loo_error")), number(a.get("mean_error")),
                     number(a.get("random_error")), number(a.get("svd_error")), a.get("bytes_in"), a.get("bytes_out")])
    return pd.DataFrame(rows, columns=ERROR_COLUMNS)


def duplicates_table(summary: dict[str, Any] | None) -> pd.DataFrame:
    report = (summary or {}).get("report") or {}
    rows = [[p["first"], p["second"], number(p["cosine"]), number(p["rel_distance"]), p["kind"]] for p in report.get("duplicates", [])]
    return pd.DataFrame(rows, columns=DUPLICATE_COLUMNS)


def energy_curve(summary: dict[str, Any] | None) -> pd.DataFrame:
    """The mean cumulative explained energy (non-decreasing, `CompressResult.explained_mean`) per
    side, plus the chosen K as a vertical line (its mean over layers)."""
    rows = []
    curves = (summary or {}).get("explained_mean", {})
    for side in ("down", "up"):
        rows += [{"components": k + 1, "explained energy": value, "curve": f"{side} factors"} for k, value in enumerate(curves.get(side, []))]
    ks = (summary or {}).get("k_summary")
    if ks and rows:
        label = f"K = {ks['min']}" if ks["min"] == ks["max"] else f"K (mean {ks['mean']:.1f}, {ks['min']}..{ks['max']})"
        rows += [{"components": ks["mean"], "explained energy": 0.0, "curve": label}, {"components": ks["mean"], "explained energy": 1.0, "curve": label}]
    return typed_frame(rows, {"components": "float64", "explained energy": "float64", "curve": "str"})


def compress_text(summary: dict[str, Any] | None) -> str:
    """The verdict, the overall numbers, K, sizes and every warning (errors above 1% or LOO above 0.5)."""
    if not summary:
        return "Not compressed yet: compress the collection to see how much structure its adapters share."
    report = summary.get("report") or {}
    overall = report.get("overall") or {}
    ks, ratio = summary["k_summary"], summary.get("ratio") or 0.0
    numbers = ", ".join(f"{key} {overall[key]:.3f}" for key in ("in_sample", "loo", "mean", "random", "svd") if overall.get(key) is not None)
    lines = [f"**{len(summary['adapters'])} adapters** in `{summary['collection']}`: K per layer {ks['min']}..{ks['max']} "
             f"(mean {ks['mean']:.1f}), {summary['bytes_in']:,} -> {summary['bytes_out']:,} bytes ({ratio:.1%}).",
             f"**Verdict:** {report.get('verdict', '(no report)')}", f"Errors (mean over adapters): {numbers}." if numbers else ""]
    high = [a for a in summary["adapters"] if (a.get("loo_error") or 0) > HIGH_ERROR or a.get("rel_error", 0) > HIGH_ERROR]
    if high:
        lines.append(f"⚠ **High errors**: {len(high)} of {len(summary['adapters'])} adapters above {HIGH_ERROR} "
                     f"(e.g. {', '.join(a['name'] for a in high[:4])}): their reconstructions are far from the originals.")
    lines += [f"⚠ {warning}" for warning in summary.get("warnings", [])]
    lines.append("The compressed adapters are in Generate as `NAME.eigen`; the zip holds the collection, its report and every "
                 "adapter reconstructed from it (named and tagged as reconstructions, with their error).")
    return "\n\n".join(line for line in lines if line)


@dataclass
class TrainView:
    """What the Train tab shows, folded from the training events as they arrive."""

    total: int = 0
    step: int = 0
    losses: dict[int, float] = field(default_factory=dict)
    validation: dict[int, float] = field(default_factory=dict)
    samples: list[tuple[Any, str]] = field(default_factory=list)
    log: list[str] = field(default_factory=list)
    speed: float | None = None
    eta: float | None = None
    result: dict[str, Any] = field(default_factory=dict)

    def add(self, event: Event) -> None:
        """Fold one event in."""
        if isinstance(event, Progress):
            self.step, self.total = event.step, event.total
            if event.loss is not None:
                self.losses[event.step] = float(event.loss)
            if "val_loss" in event.metrics:
                self.validation[event.step] = float(event.metrics["val_loss"])
            self.speed, self.eta = event.metrics.get("steps_per_s"), event.metrics.get("eta_s")
        elif isinstance(event, Sample):
            label = "base (no adapter)" if event.label == "base" else f"step {event.step}"
            self.samples.append((event.image, f"{label}: {event.prompt}"))
        elif isinstance(event, Message):
            self.log.append(("⚠ " if event.level in ("warning", "error") else "") + event.text)
        elif isinstance(event, Saved) and event.kind not in ("sample", "checkpoint", "best"):
            self.log.append(f"saved {event.kind}: {event.path.name}")
        elif isinstance(event, Done):
            self.result = train_summary(event.result)

    def loss_frame(self) -> pd.DataFrame:
        return loss_frame(self.losses, self.validation)

    def status(self) -> str:
        if self.total:
            head = f"**step {self.step} / {self.total}**"
            if self.losses:
                head += f", loss {self.losses[max(self.losses)]:.4f}"
            if self.validation:
                head += f", validation loss {self.validation[max(self.validation)]:.4f}"
            if self.speed:
                head += f", {self.speed:.2f} steps/s, ETA {_duration(self.eta)}"
        else:
            head = "loading the base and encoding the dataset ..."
        if self.result:
            head = f"**{self.result['status']}** after {self.result['steps']} steps"
        return head + "\n\n" + "\n".join(f"- {line}" for line in self.log[-8:])


def loss_frame(losses: dict[int, float], validation: dict[int, float]) -> pd.DataFrame:
    """Training and validation loss per step, for one line plot."""
    rows = [{"step": s, "loss": v, "curve": "train"} for s, v in sorted(losses.items())]
    rows += [{"step": s, "loss": v, "curve": "validation"} for s, v in sorted(validation.items())]
    return typed_frame(rows, {"step": "int64", "loss": "float64", "curve": "str"})


def _duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


def train_summary(result) -> dict[str, Any]:
    """A TrainResult as plain numbers and names."""
    return {
        "status": result.status, "steps": result.steps, "losses": {str(k): v for k, v in result.losses.items()},
        "validation": {str(k): v for k, v in result.validation.items()}, "parameters": result.parameters,
        "lora": result.lora_path.name if result.lora_path else None, "export_error": result.export_error,
        "best_step": result.best_step, "best_validation": result.best_validation,
    }


def run_choice(info) -> tuple[str, str]:
    """(label, value) of a run in the resume / export picker."""
    best = f", best at step {info.best_step}" if info.best_step is not None else ""
    return f"{info.name} — {info.status}, {info.steps_done}/{info.steps_total} steps{best}", info.name


def run_text(view) -> str:
    info = view.info
    best = f"best validation loss {info.best_validation:.4f} at step {info.best_step}" if info.best_step is not None else "no best checkpoint yet"
    resumable = "; can be resumed" if info.resumable else ""
    return f"**{info.name}** ({info.family}): {info.status}, {info.steps_done} / {info.steps_total} steps; {best}{resumable}."


def progress_text(event: Progress) -> str:
    return f"{event.stage or 'progress'}: {event.step} / {event.total}"
