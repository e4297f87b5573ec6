"""Base tab: pick the base model (the world, a diffusers folder or single file in the workspace, a
hub id) and see what it is: its family (SD 1.x/2.x, SDXL, FLUX.1, SD3.5), denoiser, guidance,
native size and the components that take adapters."""

from __future__ import annotations

import gradio as gr

from studio.app.forms import BaseForm
from studio.app.services import Studio
from studio.app.tabs import Tab
from studio.app.wiring import named, takes

KINDS = [("the embedded world", "world"), ("a diffusers folder", "folder"), ("a single .safetensors file", "file"), ("a hub id (online)", "hub")]


def build(studio: Studio) -> Tab:
    """Lay out the tab and wire Load to `Studio.pick_base`."""
    with gr.Tab("Base", id="base", elem_id="tab-base") as tab:
        gr.Markdown(f"Folders and files are named relative to the workspace `{studio.workspace.root}` (put models under `bases/`). "
                    "Adapters are read again against the new base; the workspace remembers it for the next start.")
        with gr.Row(equal_height=False):
            kind = gr.Radio(KINDS, value="world", label="Base", min_width=280)
            value = gr.Dropdown(studio.bases_in_workspace(), value="", allow_custom_value=True, label="Folder, file or hub id",
                                info="bases/my-model  |  org/name", elem_id="base-value", min_width=240)
        load = gr.Button("Load base", variant="primary")
        status = gr.Markdown(elem_id="base-status")
        summary = gr.JSON(label="Base", elem_id="base-summary")

    def shown():
        info = studio.base_info()
        loaded = f"loaded: {info['family']}, native {info['native size']} px" if info["loaded"] else f"not loaded: {info['error']}"
        text = f"Base `{info['base']}` ({loaded}); {info['adapters']} adapters fit it."
        current = studio.base_form()
        return text, info, gr.Dropdown(choices=studio.bases_in_workspace(), value=current.value), current.kind

    outputs = [status, summary, value, kind]
    load.click(takes(BaseForm, "base")(lambda form: (studio.pick_base(form), shown())[1]), inputs_kwargs=named(BaseForm, kind=kind, value=value),
               outputs=outputs, api_name="load_base", concurrency_id="engine", concurrency_limit=1, show_progress_on=[status])
    return Tab(tab, shown, outputs)
