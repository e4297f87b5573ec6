"""Collection tab: upload adapter files or name a workspace folder; a table of what loaded."""

from __future__ import annotations

import gradio as gr

from studio.app import views
from studio.app.services import Studio
from studio.app.tabs import Tab
from studio.app.wiring import friendly
from studio.errors import StudioError


def build(studio: Studio) -> Tab:
    """Lay out the tab and wire its buttons to the studio's import / inspect functions."""
    with gr.Tab("Collection", id="collection", elem_id="tab-collection") as tab:
        gr.Markdown("Import LoRA files (`.safetensors` only; pickles are refused unread). "
                    "Folders are named relative to the workspace.")
        with gr.Row():
            uploads = gr.File(label="Upload adapter files", file_count="multiple", file_types=[".safetensors"], type="filepath")
            with gr.Column():
                folder = gr.Textbox(label="Folder inside the workspace", placeholder="adapters")
                import_folder = gr.Button("Import folder")
                import_zoo = gr.Button("Import the zoo", variant="primary")
                import_files = gr.Button("Import uploaded files")
        summary = gr.Markdown(elem_id="collection-summary")
        table = gr.Dataframe(views.collection_table([]), label="Adapters", interactive=False, elem_id="collection-table", wrap=True)
        with gr.Row():
            chosen = gr.Dropdown(label="Adapter", choices=[], allow_custom_value=True)
            remove = gr.Button("Remove from collection")
        details = gr.JSON(label="Details")

    def shown(infos):
        names = [info.name for info in infos]
        return views.collection_summary(infos, studio.base), views.collection_table(infos), gr.Dropdown(choices=names)

    outputs = [summary, table, chosen]
    import_files.click(friendly(lambda files: shown(studio.import_files(files or []))), uploads, outputs, api_name="import_files")
    import_folder.click(friendly(lambda path: shown(studio.import_folder(path))), folder, outputs, api_name="import_folder")
    import_zoo.click(friendly(lambda: shown(studio.import_zoo())), None, outputs, api_name="import_zoo")
    remove.click(friendly(lambda name: shown(studio.remove(name))), chosen, outputs, api_name="remove_adapter")
    chosen.change(friendly(lambda name: details_of(studio, name)), chosen, details, api_name="adapter_details")
    return Tab(tab, lambda: shown(studio.infos), outputs)


def details_of(studio: Studio, name: str | None) -> dict:
    """The inspect row of one adapter of the collection."""
    if not name:
        return {}
    for info in studio.infos:
        if info.name == name:
            return views.adapter_details(info)
    raise StudioError(f"no adapter named {name!r} in the collection")
