"""Collection tab: upload files or name a workspace folder; a compact, searchable table of what
loaded; a details pane for any row (refused files too, with their header's metadata and, when a
file is for another base, a one-click switch to a base of the workspace that fits it)."""

from __future__ import annotations

import gradio as gr

from studio.app import views
from studio.app.forms import FolderForm, ImportForm, NameForm, SearchForm
from studio.app.services import Report, Studio
from studio.app.tabs import Tab
from studio.app.wiring import friendly, named, takes
from studio.bases import ARCH_LABELS


def build(studio: Studio) -> Tab:
    """Lay out the tab and wire its buttons to the studio's import / inspect functions."""
    with gr.Tab("Collection", id="collection", elem_id="tab-collection") as tab:
        gr.Markdown("Import LoRA files (kohya / A1111 / ComfyUI, diffusers, peft, LyCORIS), the studio's own trained adapters "
                    "(`runs/RUN/adapter.safetensors`) and compressed collections. `.safetensors` only: pickles are refused unread.")
        with gr.Row(equal_height=False):
            with gr.Column(min_width=300):
                uploads = gr.File(label="Upload adapter files", file_count="multiple", file_types=[".safetensors"], type="filepath", height=120,
                                  elem_id="collection-uploads")
                import_files = gr.Button("Import uploaded files", variant="primary")
            with gr.Column(min_width=300):
                folder = gr.Textbox(value="", label="Folder inside the workspace", placeholder="adapters", info=f"relative to {studio.workspace.root}")
                with gr.Row():
                    import_folder = gr.Button("Import folder", size="sm")
                    import_zoo = gr.Button("Re-import the zoo", size="sm", variant="secondary")
        summary = gr.Markdown(elem_id="collection-summary")
        search = gr.Textbox(value="", label="Search", placeholder="name, base, trigger word, 'refused' ...", elem_id="collection-search")
        table = gr.Dataframe(views.collection_table([]), label="Adapters", interactive=False, elem_id="collection-table",
                             wrap=True, max_height=420, column_widths=["22%", "14%", "14%", "8%", "20%", "22%"])
        with gr.Row(equal_height=False):
            chosen = gr.Dropdown(label="Details of", choices=[], value=None, allow_custom_value=True, elem_id="collection-chosen", scale=3)
            remove = gr.Button("Remove from collection", size="sm", scale=1)
        switch = gr.Button("Switch base", visible=False, elem_id="collection-switch-base", variant="primary")
        details = gr.JSON(label="Details (everything inspect reports, metadata included)", elem_id="collection-details")

    def shown(report: Report | None = None, query: str = ""):
        entries = studio.library.entries()
        names = [e.name for e in entries]
        lines = report.lines if report is not None else studio.notes[-3:]
        return (views.collection_summary(entries, studio.base_label(), lines),
                views.collection_table(entries, query), gr.Dropdown(choices=names))

    outputs = [summary, table, chosen]
    import_files.click(takes(ImportForm, "import")(lambda form: shown(studio.import_files(form.files))),
                       inputs_kwargs=named(ImportForm, files=uploads), outputs=outputs, api_name="import_files", show_progress_on=[summary])
    import_folder.click(takes(FolderForm, "import folder")(lambda form: shown(studio.import_folder(form))),
                        inputs_kwargs=named(FolderForm, folder=folder), outputs=outputs, api_name="import_folder", show_progress_on=[summary])
    import_zoo.click(friendly(lambda: shown(studio.import_zoo())), None, outputs, api_name="import_zoo", show_progress_on=[summary])
    remove.click(takes(NameForm, "remove")(lambda form: shown(studio.remove(form.name))), inputs_kwargs=named(NameForm, name=chosen),
                 outputs=outputs, api_name="remove_adapter")
    search.change(takes(SearchForm, "search")(lambda form: views.collection_table(studio.library.entries(), form.query)),
                  inputs_kwargs=named(SearchForm, query=search), outputs=table, api_name="search_collection", show_progress="hidden")
    table.select(_picked, None, chosen, api_visibility="private")
    chosen.change(takes(NameForm, "details")(lambda form: details_of(studio, form.name)), inputs_kwargs=named(NameForm, name=chosen),
                  outputs=[details, switch], api_name="adapter_details")
    switch.click(takes(NameForm, "switch base")(lambda form: switch_base(studio, form.name)), inputs_kwargs=named(NameForm, name=chosen),
                 outputs=outputs + [switch], api_name="switch_base_for", show_progress_on=[summary])
    return Tab(tab, lambda: shown(None, ""), outputs)


def _picked(event: gr.SelectData):
    """A click on a table row picks that row's adapter for the details pane."""
    row = event.row_value if event is not None else None
    return gr.Dropdown(value=row[0]) if row else gr.skip()


def details_of(studio: Studio, name: str | None):
    """The inspect row of one adapter, and the switch-base button when its file is for another base."""
    if not name:
        return {}, gr.Button(visible=False)
    entry = studio.entry(name)
    details = views.entry_details(entry)
    suggestion = suggest_base(studio, entry)
    if suggestion is None:
        return details, gr.Button(visible=False)
    label, form = suggestion
    where = form.value or form.kind
    details["fits"] = f"{label} ({where})"
    return details, gr.Button(value=f"Switch base to {label} ({where})", visible=True)


def suggest_base(studio: Studio, entry):
    """(label, BaseForm) of a workspace base that fits a file refused for another base, else None."""
    from studio.app.library import guess_arch

    arch = "" if entry.ok else guess_arch(entry)
    if not arch or (studio.engine is not None and arch == studio.engine.tree.arch):
        return None
    form = studio.base_for(arch)
    return (ARCH_LABELS.get(arch, arch), form) if form is not None else None


def switch_base(studio: Studio, name: str):
    """Load the workspace base that fits this file; the collection is read again against it."""
    from studio.errors import StudioError

    suggestion = suggest_base(studio, studio.entry(name))
    if suggestion is None:
        raise StudioError(f"{name}: no base of the workspace fits this file; put one under bases/ and load it in the Base tab")
    label, form = suggestion
    studio.pick_base(form)
    entries = studio.library.entries()
    return (views.collection_summary(entries, studio.base_label(), [f"switched the base to {label} ({form.value or form.kind}) for {name}"]),
            views.collection_table(entries), gr.Dropdown(choices=[e.name for e in entries]), gr.Button(visible=False))
