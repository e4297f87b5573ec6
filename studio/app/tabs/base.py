"""Base tab: pick the base model (the world, a folder or file in the workspace, a hub id)."""

from __future__ import annotations

import gradio as gr

from studio.app.services import Studio
from studio.app.tabs import Tab
from studio.app.wiring import friendly

KINDS = {"the embedded world": "world", "a diffusers folder": "folder", "a single .safetensors file": "file", "a hub id (online)": "hub"}


def build(studio: Studio) -> Tab:
    """Lay out the tab and wire Load to `Studio.pick_base`."""
    with gr.Tab("Base", id="base", elem_id="tab-base") as tab:
        gr.Markdown(f"Folders and files are named relative to the workspace `{studio.workspace.root}` "
                    "(put models under `bases/`). Adapters are re-checked against the new base.")
        kind = gr.Radio(list(KINDS), value="the embedded world", label="Base")
        value = gr.Textbox(label="Folder, file or hub id", placeholder="bases/my-model  |  org/name")
        load = gr.Button("Load base", variant="primary")
        status = gr.Markdown(elem_id="base-status")
        summary = gr.JSON(label="Base")

    def shown():
        loaded = "loaded" if studio.engine is not None else f"not loaded: {studio.base_error}"
        adapters = sum(1 for info in studio.infos if not info.error)
        return f"Base `{studio.base_label()}` ({loaded}); {adapters} adapters fit it.", {"base": studio.base_label(), "loaded": studio.engine is not None, "adapters": adapters}

    def pick(label: str, text: str):
        studio.pick_base(KINDS[label], text or "")
        return shown()

    load.click(friendly(pick), [kind, value], [status, summary], api_name="load_base", concurrency_id="engine", concurrency_limit=1)
    return Tab(tab, shown, [status, summary])
