"""Train tab: a dataset (an uploaded zip, kohya folders kept, or a world style) with its captions,
repeats and validation split; a family with its knobs as form fields and its measured defaults;
live progress (loss and validation loss, steps/s, ETA, the baseline sample beside the training
samples); stop, resume from the run list, export a run's best checkpoint."""

from __future__ import annotations

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
    """Lay out the tab and wire it to `studio.training`."""
    training = studio.training
    collections = _collections(studio)
    defaults = registry.family(DEFAULT_FAMILY).defaults
    with gr.Tab("Train", id="train", elem_id="tab-train") as tab:
        with gr.Row(equal_height=False):
            with gr.Column(min_width=320):
                gr.Markdown("**Dataset**: images with same-named `.txt` captions; kohya `N_name/` folders repeat their images N times.")
                with gr.Accordion("Upload a zip", open=False):
                    archive = gr.File(label="Dataset zip", file_types=[".zip"], type="filepath", height=100, elem_id="train-archive")
                    with gr.Row():
                        dataset_name = gr.Textbox(label="Dataset name", value="my-dataset", min_width=140)
                        repeats = gr.Number(value=1, precision=0, label="Repeats", info="of images not in an N_name folder", min_width=120)
                        flat_trigger = gr.Textbox(value="", label="Folder trigger word", info="their N_trigger folder (empty: the name)", min_width=140)
                    upload = gr.Button("Upload dataset")
                with gr.Row(equal_height=False):
                    style = gr.Dropdown(_styles(), value=(_styles() or [None])[0], allow_custom_value=True, label="World style", min_width=140)
                    count = gr.Number(value=16, precision=0, label="Images", info="1..4096", min_width=100)
                    make_style = gr.Button("Render style", min_width=120)
                dataset = gr.Dropdown(training.datasets(), value=None, label="Dataset folder (in the workspace)", allow_custom_value=True, elem_id="train-dataset")
                validation_split = gr.Slider(0.0, 0.9, value=0.1, step=0.05, label="Validation split", info=hint(TrainForm, "validation_split"))
                dataset_text = gr.Markdown(elem_id="train-dataset-info")
                preview = gr.Gallery(label="Dataset preview (captions below each image)", columns=6, height=220, object_fit="contain", elem_id="train-preview")
                with gr.Row(equal_height=False):
                    repeat_folder = gr.Dropdown([], value="", label="Folder", allow_custom_value=True, info="'' is the dataset's top", min_width=140)
                    repeat_count = gr.Number(value=1, precision=0, label="Repeats per epoch", min_width=120)
                    set_repeats = gr.Button("Set repeats", min_width=120)
            with gr.Column(min_width=320):
                family = gr.Dropdown(sorted(registry.families()), value=DEFAULT_FAMILY, label="Adapter family", info=_summary(DEFAULT_FAMILY))
                groups, fields = {}, {}
                for name, item in sorted(registry.families().items()):
                    with gr.Group(visible=name == DEFAULT_FAMILY) as group:
                        fields[name] = knob_fields(item.config_class, collections)
                    groups[name] = group
                knobs = gr.JSON(default_table(registry.family(DEFAULT_FAMILY).config_class, collections), label="[adapter] table of the run",
                        elem_id="train-knobs")
                with gr.Row(equal_height=False):
                    name = gr.Textbox(value="my-adapter", label="Run name", min_width=140)
                    steps = gr.Number(value=defaults.steps, precision=0, label="Steps", min_width=100)
                    learning_rate = gr.Number(value=defaults.learning_rate, label="Learning rate", min_width=100)
                    batch_size = gr.Number(value=defaults.batch_size, precision=0, label="Batch size", min_width=100)
                gr.Markdown("Steps, learning rate and batch size start at the family's measured defaults (BENCHMARKS.md, training quality).")
                with gr.Row(equal_height=False):
                    trigger = gr.Textbox(value="", label="Trigger word", info=hint(TrainForm, "trigger_word"), min_width=140)
                    sample_prompt = gr.Textbox(value="", label="Sample prompt", info=hint(TrainForm, "sample_prompt"), min_width=200)
                with gr.Row(equal_height=False):
                    sample_every = gr.Number(value=0, precision=0, label="Sample every", info=hint(TrainForm, "sample_every"), min_width=100)
                    checkpoint_every = gr.Number(value=0, precision=0, label="Checkpoint every", info=hint(TrainForm, "checkpoint_every"), min_width=100)
                    resolution = gr.Number(value=0, precision=0, label="Resolution", info=hint(TrainForm, "resolution"), min_width=100)
                    seed = gr.Number(value=0, precision=0, label="Seed", min_width=100)
                with gr.Row(equal_height=False):
                    export_format = gr.Radio(["kohya", "diffusers", "none"], value="kohya", label="Export format", min_width=200)
                    export_rank = gr.Number(value=0, precision=0, label="Export rank", info=hint(TrainForm, "export_rank"), min_width=140)
                with gr.Row():
                    start = gr.Button("Train", variant="primary")
                    stop = gr.Button("Stop", variant="stop")
                stop_note = gr.Markdown(elem_id="train-stop-note")  # apart from the status: the run's last word is never overwritten
        status = gr.Markdown(elem_id="train-status")
        with gr.Row(equal_height=False):
            loss_plot = gr.LinePlot(views.loss_frame({}, {}), x="step", y="loss", color="curve", title="Loss (train and validation)",
                                    height=280, min_width=300, elem_id="train-loss")
            samples = gr.Gallery(label="Samples (the base without adapter first)", columns=4, height=280, object_fit="contain",
                                 elem_id="train-samples", min_width=300)
        result = gr.JSON(label="Result")
        with gr.Row(equal_height=False):
            run_pick = gr.Dropdown([], value=None, allow_custom_value=True, label="Runs in the workspace", elem_id="train-runs", min_width=240,
                                   scale=2)
            resume = gr.Button("Resume", min_width=100)
            checkpoint = gr.Radio([("best (lowest validation loss)", "best"), ("final", "final")], value="best", label="Export", min_width=200)
            export_layout = gr.Radio(["kohya", "diffusers"], value="kohya", label="Layout", min_width=160)
            export = gr.Button("Export as LoRA", min_width=120)
        run_text = gr.Markdown(elem_id="train-run-info")
        exported = gr.File(label="Exported LoRA", interactive=False)

    train_outputs = [status, loss_plot, samples, result]
    dataset_outputs = [dataset, dataset_text, preview, repeat_folder, trigger, sample_prompt]

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

    upload.click(takes(ArchiveForm, "upload dataset")(lambda form: made(training.upload_dataset(form), 0.1)),
                 inputs_kwargs=named(ArchiveForm, archive=archive, name=dataset_name, repeats=repeats, trigger_word=flat_trigger),
                 outputs=dataset_outputs, api_name="upload_dataset")
    make_style.click(takes(StyleForm, "style dataset")(lambda form: made(training.style_dataset(form), 0.1)),
                     inputs_kwargs=named(StyleForm, style=style, count=count), outputs=dataset_outputs, api_name="style_dataset")
    view_inputs = named(DatasetView, dataset=dataset, validation_split=validation_split)
    dataset.input(takes(DatasetView, "dataset")(show_dataset), inputs_kwargs=view_inputs, outputs=dataset_outputs, api_name="dataset_info")
    validation_split.release(takes(DatasetView, "dataset")(show_dataset), inputs_kwargs=view_inputs, outputs=dataset_outputs,
                             api_visibility="private")

    def repeated(form: RepeatsForm):
        training.set_repeats(form)
        return made(form.dataset, 0.1)

    set_repeats.click(takes(RepeatsForm, "repeats")(repeated), inputs_kwargs=named(RepeatsForm, dataset=dataset, folder=repeat_folder,
                                                                                   repeats=repeat_count),
                      outputs=dataset_outputs, api_name="set_repeats")

    _wire_family(family, groups, fields, knobs, learning_rate, batch_size, steps, studio)

    def train(progress=gr.Progress(), **values):
        yield from _stream(training.train(form_of(TrainForm, values, "train")), progress, views.TrainView())

    def resume_run(progress=gr.Progress(), **values):
        form = form_of(RunForm, values, "resume")
        view = training.run(form.run)
        start_view = views.TrainView(losses=dict(view.losses), validation=dict(view.validation),
                                     samples=[(str(p), label) for p, label in view.samples])
        yield from _stream(training.resume(form.run), progress, start_view)

    train_inputs = named(TrainForm, name=name, dataset=dataset, family=family, knobs=knobs, steps=steps, learning_rate=learning_rate,
                         batch_size=batch_size, resolution=resolution, trigger_word=trigger, validation_split=validation_split,
                         sample_every=sample_every, sample_prompt=sample_prompt, checkpoint_every=checkpoint_every,
                         export_format=export_format, export_rank=export_rank, seed=seed)
    trained = start.click(friendly(train), inputs_kwargs=train_inputs, outputs=train_outputs, api_name="train", concurrency_id="jobs",
                          concurrency_limit=1, show_progress_on=[status])
    resumed = resume.click(friendly(resume_run), inputs_kwargs=named(RunForm, run=run_pick), outputs=train_outputs,
                           api_name="resume_training", concurrency_id="jobs", concurrency_limit=1, show_progress_on=[status])
    stop.click(friendly(training.stop), None, stop_note, api_name="stop_training", queue=False)
    for button in (start, resume):
        button.click(lambda: "", None, stop_note, api_visibility="private", queue=False)

    def runs_list(selected: str | None = None):
        runs = training.runs()
        choices = [views.run_choice(info) for info in runs]
        value = selected if selected in [c[1] for c in choices] else (choices[0][1] if choices else None)
        return gr.Dropdown(choices=choices, value=value)

    def show_run(form: RunForm):
        view = training.run(form.run)
        return views.run_text(view), views.loss_frame(view.losses, view.validation), [(str(p), label) for p, label in view.samples]

    run_pick.input(takes(RunForm, "run")(show_run), inputs_kwargs=named(RunForm, run=run_pick), outputs=[run_text, loss_plot, samples], api_name="run_info")
    for event in (trained, resumed):
        event.then(lambda: runs_list(), None, run_pick, api_visibility="private")

    def export_run(form: ExportRunForm):
        path, done = training.export_run(form)
        error = f", relative error {done.error:.2e}" if done.error is not None else ""
        warnings = "".join(f"\n\n⚠ {w}" for w in done.warnings)
        return f"exported {form.run}'s {form.checkpoint} adapter as {path.name} ({done.layout}{error}); it joined the collection{warnings}", str(path)

    export.click(takes(ExportRunForm, "export run")(export_run), inputs_kwargs=named(ExportRunForm, run=run_pick, checkpoint=checkpoint, format=export_layout),
                 outputs=[run_text, exported], api_name="export_run")

    def shown(picked_run: str | None = None):
        return gr.Dropdown(choices=training.datasets()), runs_list(picked_run), gr.Dropdown(choices=_collections(studio))

    collection_field = fields["eigenlora"]["collection"]
    return Tab(tab, shown, [dataset, run_pick, collection_field], [run_pick])


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
