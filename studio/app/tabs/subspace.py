"""Subspace tab: compress the collection (by explained energy, or K per layer), then what the
collection is worth: the verdict against the mean / random / SVD baselines, per-adapter in-sample
and leave-one-out errors, near-duplicates, the energy curve with K marked, one zip download."""

from __future__ import annotations

import gradio as gr

from studio.app import views
from studio.app.forms import CompressForm
from studio.app.services import Studio
from studio.app.tabs import Tab
from studio.app.wiring import form_of, friendly, named
from studio.events import Done, Message, Progress

SIZE_BY = [("explained energy (per layer)", "energy"), ("K per layer", "k")]


def build(studio: Studio) -> Tab:
    """Lay out the tab and wire Compress to `Studio.compress` (which streams its events)."""
    with gr.Tab("Subspace", id="subspace", elem_id="tab-subspace") as tab:
        gr.Markdown("Compress the collection into shared EigenLoRAx components plus small per-adapter loadings, and see whether "
                    "its adapters share structure (leave-one-out error against the mean adapter, a random subspace and per-adapter SVD).")
        with gr.Row(equal_height=False):
            size_by = gr.Radio(SIZE_BY, value="energy", label="Size the subspace by", min_width=240)
            energy = gr.Slider(0.05, 1.0, value=0.9, step=0.01, label="Energy threshold", info="share of each layer's energy kept", min_width=200)
            k = gr.Number(value=4, precision=0, label="K (components per layer)", info="with 'K per layer' (1..4096)", min_width=160)
        with gr.Row(equal_height=False):
            augment = gr.Number(value=0, precision=0, label="Augment", info="extra random components per layer (0..4096)", min_width=160)
            export_format = gr.Radio(["kohya", "diffusers"], value="kohya", label="Layout of the reconstructions", min_width=200)
            run = gr.Button("Compress", variant="primary", min_width=160)
        status = gr.Markdown(views.compress_text(None), elem_id="subspace-status")
        with gr.Row(equal_height=False):
            plot = gr.LinePlot(views.energy_curve(None), x="components", y="explained energy", color="curve",
                               title="Explained energy (mean over layers) and the chosen K", y_lim=[0, 1.02], height=300, min_width=300)
            errors = gr.Dataframe(views.error_table(None), label="Reconstruction errors (in-sample, leave-one-out, baselines)",
                                  interactive=False, elem_id="subspace-errors", max_height=300, min_width=300)
        duplicates = gr.Dataframe(views.duplicates_table(None), label="Near-duplicates in weight space", interactive=False,
                                  elem_id="subspace-duplicates", max_height=200)
        download = gr.File(label="Download: collection, report and reconstructions (one zip)", interactive=False, elem_id="subspace-zip")
        summary = gr.JSON(label="Report (as studio compress --json)", visible=False)

    outputs = [status, plot, errors, duplicates, download, summary]

    def compress(progress=gr.Progress(), **values):
        form = form_of(CompressForm, values, "compress")
        for event in studio.compress(form):
            if isinstance(event, Message):
                yield (f"{event.text}",) + (gr.skip(),) * 5
            elif isinstance(event, Progress):
                progress((event.step, event.total), desc=event.stage or "compress")
                yield (views.progress_text(event),) + (gr.skip(),) * 5
            elif isinstance(event, Done):
                yield finished(studio, event.result)

    run.click(friendly(compress), inputs_kwargs=named(CompressForm, size_by=size_by, energy=energy, k=k, augment=augment,
                                                      export_format=export_format),
              outputs=outputs, api_name="compress", concurrency_id="jobs", concurrency_limit=1, show_progress_on=[status])
    return Tab(tab, lambda: finished(studio, studio.compressed) if studio.compressed else (gr.skip(),) * 6, outputs)


def finished(studio: Studio, summary: dict) -> tuple:
    """Everything the tab shows of a compress report (also after a restart: it is kept beside the file)."""
    zip_path = studio.workspace.folder("compressed") / summary["zip"] if summary.get("zip") else None
    return (views.compress_text(summary), views.energy_curve(summary), views.error_table(summary), views.duplicates_table(summary),
            str(zip_path) if zip_path is not None and zip_path.is_file() else None, summary)
