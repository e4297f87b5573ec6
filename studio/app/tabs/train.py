"""Train tab: a dataset (an uploaded zip, kohya folders kept, or a world style) with its captions,
repeats and validation split; a family with its knobs as form fields and its measured defaults;
live progress (loss and validation loss, steps/s, ETA, the baseline sample beside the training
samples); stop, resume from the run list, export a run's best checkpoint."""

from __future__ import annotations

from types import SimpleNamespace

import gradio as gr

from studio.adapters import registry
from studio.app import views
from studio.app.forms import ArchiveForm, DatasetView, ExportRunForm, RepeatsForm, RunForm, StyleForm, TrainForm
from studio.app.services import Studio
from studio.app.tabs import Tab
from studio.app.tabs.knobs import default_table, field_values, knob_fields, knob_table
from studio.app.wiring import form_of, friendly, hint, named, takes
from studio.events import Done, Progress, Sample

DEFAULT_FAMILY = "lora"


def build(studio: Studio) -> Tab:
    """Lay out the tab (dataset column, run column, progress, runs) and wire it to `studio.training`."""
    with gr.Tab("Train", id="train", elem_id="tab-train") as tab:
        with gr.Row(equal_height=False):
            data = _dataset_column(studio)
            run = _run_column(studio)
        shown = _progress_area()
    _wire_dataset(studio, data, run)
    _wire_family(run.family, run.groups, run.fields, run.knobs, run.learning_rate, run.batch_size, run.steps, studio)
    _wire_training(studio, data, run, shown)

    def refreshed(picked_run: str | None = None):
        return gr.Dropdown(choices=studio.training.datasets()), _runs_list(studio, picked_run), gr.Dropdown(choices=_collections(studio))

    collection_field = run.fields["eigenlora"]["collection"]
    return Tab(tab, refreshed, [data.dataset, shown.run_pick, collection_field], [shown.run_pick])


def _dataset_column(studio: Studio) -> SimpleNamespace:
    """Upload a zip, render a world style, pick a dataset folder; its preview and repeats."""
    c = SimpleNamespace()
    with gr.Column(min_width=320):
        gr.Markdown("**Dataset**: images with same-named `.txt` captions; kohya `N_name/` folders repeat their images N times.")
        with gr.Accordion("Upload a zip", open=False):
            c.archive = gr.File(label="Dataset zip", file_types=[".zip"], type="filepath", height=100, elem_id="train-archive")
            with gr.Row():
                c.dataset_name = gr.Textbox(label="Dataset name", value="my-dataset", min_width=140)
                c.repeats = gr.Number(value=1, precision=0, label="Repeats", info="of images not in an N_name folder", min_width=120)
                c.flat_trigger = gr.Textbox(value="", label="Folder trigger word", info="their N_trigger folder (empty: the name)", min_width=140)
            c.upload = gr.Button("Upload dataset")
        with gr.Row(equal_height=False):
            c.style = gr.Dropdown(_styles(), value=(_styles() or [None])[0], allow_custom_value=True, label="World style", min_width=140)
            c.count = gr.Number(value=16, precision=0, label="Images", info="1..4096", min_width=100)
            c.make_style = gr.Button("Render style", min_width=120)
        c.dataset = gr.Dropdown(studio.training.datasets(), value=None, label="Dataset folder (in the workspace)", allow_custom_value=True,
                                elem_id="train-dataset")
        c.validation_split = gr.Slider(0.0, 0.9, value=0.1, step=0.05, label="Validation split", info=hint(TrainForm, "validation_split"))
        c.dataset_text = gr.Markdown(elem_id="train-dataset-info")
        c.preview = gr.Gallery(label="Dataset preview (captions below each image)", columns=6, height=220, object_fit="contain",
                               elem_id="train-preview")
        with gr.Row(equal_height=False):
            c.repeat_folder = gr.Dropdown([], value="", label="Folder", allow_custom_value=True, info="'' is the dataset's top", min_width=140)
            c.repeat_count = gr.Number(value=1, precision=0, label="Repeats per epoch", min_width=120)
            c.set_repeats = gr.Button("Set repeats", min_width=120)
    return c


def _run_column(studio: Studio) -> SimpleNamespace:
    """The family and its knobs, the run's settings, Train / Stop."""
    c = SimpleNamespace()
    collections = _collections(studio)
    defaults = registry.family(DEFAULT_FAMILY).defaults
    with gr.Column(min_width=320):
        c.family = gr.Dropdown(sorted(registry.families()), value=DEFAULT_FAMILY, label="Adapter family", info=_summary(DEFAULT_FAMILY))
        c.groups, c.fields = {}, {}
        for name, item in sorted(registry.families().items()):
            with gr.Group(visible=name == DEFAULT_FAMILY) as group:
                c.fields[name] = knob_fields(item.config_class, collections)
            c.groups[name] = group
        c.knobs = gr.JSON(default_table(registry.family(DEFAULT_FAMILY).config_class, collections), label="[adapter] table of the run",
                          elem_id="train-knobs")
        with gr.Row(equal_height=False):
            c.name = gr.Textbox(value="my-adapter", label="Run name", min_width=140)
            c.steps = gr.Number(value=defaults.steps, precision=0, label="Steps", min_width=100)
            c.learning_rate = gr.Number(value=defaults.learning_rate, label="Learning rate", min_width=100)
            c.batch_size = gr.Number(value=defaults.batch_size, precision=0, label="Batch size", min_width=100)
        gr.Markdown("Steps, learning rate and batch size start at the family's measured defaults (BENCHMARKS.md, training quality).")
        with gr.Row(equal_height=False):
            c.trigger = gr.Textbox(value="", label="Trigger word", info=hint(TrainForm, "trigger_word"), min_width=140)
            c.sample_prompt = gr.Textbox(value="", label="Sample prompt", info=hint(TrainForm, "sample_prompt"), min_width=200)
        with gr.Row(equal_height=False):
            c.sample_every = gr.Number(value=0, precision=0, label="Sample every", info=hint(TrainForm, "sample_every"), min_width=100)
            c.checkpoint_every = gr.Number(value=0, precision=0, label="Checkpoint every", info=hint(TrainForm, "checkpoint_every"), min_width=100)
            c.resolution = gr.Number(value=0, precision=0, label="Resolution", info=hint(TrainForm, "resolution"), min_width=100)
            c.seed = gr.Number(value=0, precision=0, label="Seed", min_width=100)
        with gr.Row(equal_height=False):
            c.export_format = gr.Radio(["kohya", "diffusers", "none"], value="kohya", label="Export format", min_width=200)
            c.export_rank = gr.Number(value=0, precision=0, label="Export rank", info=hint(TrainForm, "export_rank"), min_width=140)
            c.caption_dropout = gr.Number(value=0.0, minimum=0, maximum=1, label="Caption dropout", info=hint(TrainForm, "caption_dropout"), min_width=140)
        with gr.Row():
            c.start = gr.Button("Train", variant="primary")
            c.stop = gr.Button("Stop", variant="stop")
        c.stop_note = gr.Markdown(elem_id="train-stop-note")  # apart from the status: the run's last word is never overwritten
    return c


def _progress_area() -> SimpleNamespace:
    """Status, the loss plot, samples, the result; the workspace's runs with Resume and Export."""
    c = SimpleNamespace()
    c.status = gr.Markdown(elem_id="train-status")
    with gr.Row(equal_height=False):
        c.loss_plot = gr.LinePlot(views.loss_frame({}, {}), x="step", y="loss", color="curve", title="Loss (train and validation)",
                                  height=280, min_width=300, elem_id="train-loss")
        c.samples = gr.Gallery(label="Samples (the base without adapter first)", columns=4, height=280, object_fit="contain",
                               elem_id="train-samples", min_width=300)
    c.result = gr.JSON(label="Result")
    with gr.Row(equal_height=False):
        c.run_pick = gr.Dropdown([], value=None, allow_custom_value=True, label="Runs in the workspace", elem_id="train-runs", min_width=240,
                                 scale=2)
        c.resume = gr.Button("Resume", min_width=100)
        c.checkpoint = gr.Radio([("best (lowest validation loss)", "best"), ("final", "final")], value="best", label="Export", min_width=200)
        c.export_layout = gr.Radio(["kohya", "diffusers"], value="kohya", label="Layout", min_width=160)
        c.export = gr.Button("Export as LoRA", min_width=120)
    c.run_text = gr.Markdown(elem_id="train-run-info")
    c.exported = gr.File(label="Exported LoRA", interactive=False)
    return c


def _wire_dataset(studio: Studio, data: SimpleNamespace, run: SimpleNamespace) -> None:
    """Upload, render, pick and re-count a dataset: each shows the folder, its summary, preview, trigger and sample prompt."""
    training = studio.training
    outputs = [data.dataset, data.dataset_text, data.preview, data.repeat_folder, run.trigger, run.sample_prompt]

    def show_dataset(form: DatasetView):
        if not form.dataset.strip():  # the picker closed without a choice: say what to do, no error
            return ("", "Pick a dataset folder, upload a zip or render a world style to see its images, captions, repeats and "
                    "validation split.", [], gr.Dropdown(choices=[], value=""), gr.skip(), gr.skip())
        view = training.dataset(form)
        images = [(str(image), f"{caption} (x{n})" if n > 1 else caption) for image, caption, n in view.pairs[:24]]
        return (view.folder, view.summary(form.validation_split), images,
                gr.Dropdown(choices=list(view.folders), value=next(iter(view.folders), "")), view.trigger_word, view.sample_prompt)

    def made(folder: str, split: float):
        return show_dataset(DatasetView(folder, split))

    def repeated(form: RepeatsForm):
        training.set_repeats(form)
        return made(form.dataset, 0.1)

    data.upload.click(takes(ArchiveForm, "upload dataset")(lambda form: made(training.upload_dataset(form), 0.1)),
                      inputs_kwargs=named(ArchiveForm, archive=data.archive, name=data.dataset_name, repeats=data.repeats,
                                          trigger_word=data.flat_trigger),
                      outputs=outputs, api_name="upload_dataset")
    data.make_style.click(takes(StyleForm, "style dataset")(lambda form: made(training.style_dataset(form), 0.1)),
                          inputs_kwargs=named(StyleForm, style=data.style, count=data.count), outputs=outputs, api_name="style_dataset")
    view_inputs = named(DatasetView, dataset=data.dataset, validation_split=data.validation_split)
    data.dataset.input(takes(DatasetView, "dataset")(show_dataset), inputs_kwargs=view_inputs, outputs=outputs, api_name="dataset_info")
    data.validation_split.release(takes(DatasetView, "dataset")(show_dataset), inputs_kwargs=view_inputs, outputs=outputs,
                                  api_visibility="private")
    data.set_repeats.click(takes(RepeatsForm, "repeats")(repeated),
                           inputs_kwargs=named(RepeatsForm, dataset=data.dataset, folder=data.repeat_folder, repeats=data.repeat_count),
                           outputs=outputs, api_name="set_repeats")


def _wire_training(studio: Studio, data: SimpleNamespace, run: SimpleNamespace, shown: SimpleNamespace) -> None:
    """Train, resume, stop; the run list, a run's details and its export."""
    training = studio.training
    outputs = [shown.status, shown.loss_plot, shown.samples, shown.result]

    def train(progress=gr.Progress(), **values):
        yield from _stream(training.train(form_of(TrainForm, values, "train")), progress, views.TrainView())

    def resume_run(progress=gr.Progress(), **values):
        form = form_of(RunForm, values, "resume")
        view = training.run(form.run)
        start_view = views.TrainView(losses=dict(view.losses), validation=dict(view.validation),
                                     samples=[(str(p), label) for p, label in view.samples])
        yield from _stream(training.resume(form.run), progress, start_view)

    inputs = named(TrainForm, name=run.name, dataset=data.dataset, family=run.family, knobs=run.knobs, steps=run.steps,
                   learning_rate=run.learning_rate, batch_size=run.batch_size, resolution=run.resolution, trigger_word=run.trigger,
                   validation_split=data.validation_split, sample_every=run.sample_every, sample_prompt=run.sample_prompt,
                   checkpoint_every=run.checkpoint_every, export_format=run.export_format, export_rank=run.export_rank, seed=run.seed,
                   caption_dropout=run.caption_dropout)
    trained = run.start.click(friendly(train), inputs_kwargs=inputs, outputs=outputs, api_name="train", concurrency_id="jobs",
                              concurrency_limit=1, show_progress_on=[shown.status])
    resumed = shown.resume.click(friendly(resume_run), inputs_kwargs=named(RunForm, run=shown.run_pick), outputs=outputs,
                                 api_name="resume_training", concurrency_id="jobs", concurrency_limit=1, show_progress_on=[shown.status])
    run.stop.click(friendly(training.stop), None, run.stop_note, api_name="stop_training", queue=False)
    for button in (run.start, shown.resume):
        button.click(lambda: "", None, run.stop_note, api_visibility="private", queue=False)
    for event in (trained, resumed):
        event.then(lambda: _runs_list(studio), None, shown.run_pick, api_visibility="private")
    _wire_runs(studio, shown)


def _wire_runs(studio: Studio, shown: SimpleNamespace) -> None:
    """Picking a run shows its details, loss history and samples; Export writes its best or final adapter."""
    training = studio.training

    def show_run(form: RunForm):
        view = training.run(form.run)
        return views.run_text(view), views.loss_frame(view.losses, view.validation), [(str(p), label) for p, label in view.samples]

    def export_run(form: ExportRunForm):
        path, done = training.export_run(form)
        error = f", relative error {done.error:.2e}" if done.error is not None else ""
        warnings = "".join(f"\n\n⚠ {w}" for w in done.warnings)
        return f"exported {form.run}'s {form.checkpoint} adapter as {path.name} ({done.layout}{error}); it joined the collection{warnings}", str(path)

    shown.run_pick.input(takes(RunForm, "run")(show_run), inputs_kwargs=named(RunForm, run=shown.run_pick),
                         outputs=[shown.run_text, shown.loss_plot, shown.samples], api_name="run_info")
    shown.export.click(takes(ExportRunForm, "export run")(export_run),
                       inputs_kwargs=named(ExportRunForm, run=shown.run_pick, checkpoint=shown.checkpoint, format=shown.export_layout),
                       outputs=[shown.run_text, shown.exported], api_name="export_run")


def _runs_list(studio: Studio, selected: str | None = None):
    """The run picker's choices, the selected run kept when it is still there (else the newest)."""
    choices = [views.run_choice(info) for info in studio.training.runs()]
    value = selected if selected in [c[1] for c in choices] else (choices[0][1] if choices else None)
    return gr.Dropdown(choices=choices, value=value)


def _wire_family(family, groups, fields, knobs, learning_rate, batch_size, steps, studio: Studio) -> None:
    """Family change: its fields shown with their defaults, its measured lr / batch / steps; any
    field change: the [adapter] table recomputed."""
    names = sorted(groups)

    def picked(chosen: str):
        item = registry.family(chosen)
        collections = _collections(studio)
        shown = [gr.Group(visible=name == chosen) for name in names]
        resets = [value for name in names for value in (field_values(registry.family(name).config_class, collections) if name == chosen
                                                        else [gr.skip()] * len(fields[name]))]
        return (*shown, *resets, default_table(item.config_class, collections), item.defaults.learning_rate, item.defaults.batch_size,
                item.defaults.steps, gr.Dropdown(info=_summary(chosen)))

    every = [field for name in names for field in fields[name].values()]
    family.input(friendly(picked), family, [*(groups[n] for n in names), *every, knobs, learning_rate, batch_size, steps, family],
                 api_name="family_defaults")
    for name in names:
        table_of = _table_maker(registry.family(name).config_class)
        for field in fields[name].values():
            field.change(table_of, inputs_kwargs=dict(fields[name]), outputs=knobs, api_visibility="private", show_progress="hidden")


def _table_maker(config_class):
    def table(**values):
        return knob_table(config_class, values)
    return table


def _stream(events, progress, view: views.TrainView):
    """Training events as page updates: status (one progress bar), loss plot, samples, the result at the end."""
    for event in events:
        view.add(event)
        if isinstance(event, Progress):
            progress((event.step, event.total), desc="training")
            yield view.status(), view.loss_frame(), gr.skip(), gr.skip()
        elif isinstance(event, Sample):
            yield view.status(), gr.skip(), view.samples, gr.skip()
        elif isinstance(event, Done):
            yield view.status(), view.loss_frame(), view.samples, view.result
        else:
            yield view.status(), gr.skip(), gr.skip(), gr.skip()


def _collections(studio: Studio) -> list[str]:
    """Compressed collections of the workspace, the latest first (eigenlora's collection field)."""
    folder = studio.workspace.folder("compressed")
    files = sorted(folder.glob("*.safetensors"), key=lambda p: p.stat().st_mtime, reverse=True)
    return [studio.workspace.relative(p) for p in files if studio.workspace.contains(p)]


def _summary(family: str) -> str:
    item = registry.family(family)
    d = item.defaults
    return f"{item.summary}. Measured defaults: lr {d.learning_rate:g}, batch {d.batch_size}, {d.steps} steps."


def _styles() -> list[str]:
    try:
        from studio.verbs.dataset import world_styles

        return world_styles()
    except Exception:  # noqa: BLE001 - the world room may be missing; the rest of the tab still works
        return []
