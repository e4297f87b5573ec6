"""Subspace tab: compress the collection (K or energy), plot the energy, list errors, download."""

from __future__ import annotations

import gradio as gr

from studio.app import views
from studio.app.services import CompressForm, Studio
from studio.app.tabs import Tab
from studio.app.wiring import friendly
from studio.events import Done, Message, Progress


def build(studio: Studio) -> Tab:
    """Lay out the tab and wire Compress to `Studio.compress` (which streams its events)."""
    with gr.Tab("Subspace", id="subspace", elem_id="tab-subspace") as tab:
        gr.Markdown("Compress the collection into shared EigenLoRAx components plus small per-adapter loadings.")
        with gr.Row():
            size_by = gr.Radio(["K per layer", "energy threshold"], value="K per layer", label="Size the subspace by")
            k = gr.Number(value=4, precision=0, minimum=1, label="K (components per layer)")
            energy = gr.Slider(0.05, 1.0, value=0.9, step=0.01, label="Energy threshold")
            augment = gr.Number(value=0, precision=0, minimum=0, label="Augment (extra random components)")
            export_format = gr.Radio(["kohya", "diffusers"], value="kohya", label="Export layout")
        run = gr.Button("Compress", variant="primary")
        status = gr.Markdown(elem_id="subspace-status")
        with gr.Row():
            plot = gr.LinePlot(None, x="components", y="explained energy", color="factor", color_map={"down": "#1f77b4", "up": "#ff7f0e"},
                               title="Explained energy (mean over layers)", y_lim=[0, 1], height=300)
            errors = gr.Dataframe(views.error_table(_Empty()), label="Reconstruction error", interactive=False, elem_id="subspace-errors")
        files = gr.File(label="Download: compressed collection and exported LoRAs", file_count="multiple", interactive=False)
        summary = gr.JSON(label="Summary")

    def compress(by: str, k_value, energy_value, augment_value, layout: str, progress=gr.Progress()):
        form = CompressForm(k=int(k_value) if by == "K per layer" else None,
                            energy=float(energy_value) if by != "K per layer" else None,
                            augment=int(augment_value or 0), export_format=layout)
        for event in studio.compress(form):
            if isinstance(event, Message):
                yield event.text, gr.skip(), gr.skip(), gr.skip(), gr.skip()
            elif isinstance(event, Progress):
                progress((event.step, event.total), desc=event.stage)
                yield views.progress_text(event), gr.skip(), gr.skip(), gr.skip(), gr.skip()
            elif isinstance(event, Done):
                yield _finished(event.result)

    run.click(friendly(compress), [size_by, k, energy, augment, export_format], [status, plot, errors, files, summary],
              api_name="compress", concurrency_id="jobs", concurrency_limit=1)
    return Tab(tab, lambda: _finished(studio.compressed) if studio.compressed else (gr.skip(),) * 5, [status, plot, errors, files, summary])


def _finished(outcome) -> tuple:
    summary = views.compress_summary(outcome)
    ratio = summary["ratio"] or 0.0
    text = (f"**{len(outcome.result.adapters)} adapters** compressed: K per layer {summary['k_summary']['min']}..{summary['k_summary']['max']}, "
            f"{summary['bytes_in']:,} -> {summary['bytes_out']:,} bytes ({ratio:.1%}). "
            f"Compressed adapters are available in Generate as `NAME.eigen`.")
    files = [str(outcome.path)] + [str(p) for p in outcome.exports]
    return text, views.explained_curve(outcome.result), views.error_table(outcome.result), files, summary


class _Empty:
    """A result with nothing in it, for the empty plot and table at start."""

    adapters: list = []
    explained: dict = {}
