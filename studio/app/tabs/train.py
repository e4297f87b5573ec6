"""Train tab: a dataset (uploaded zip or a world style), a family and its knobs, live progress."""

from __future__ import annotations

import json

import gradio as gr

from studio.app import services, views
from studio.app.services import Studio, TrainForm
from studio.app.tabs import Tab
from studio.app.wiring import friendly
from studio.errors import ConfigError
from studio.events import Done, Progress, Sample

DEFAULT_FAMILY = "lora"


def build(studio: Studio) -> Tab:
    """Lay out the tab and wire it to `Studio.train` / `resume` / `stop` and the dataset helpers."""
    with gr.Tab("Train", id="train", elem_id="tab-train") as tab:
        with gr.Row():
            with gr.Column():
                gr.Markdown("**Dataset**: a zip of images with same-named `.txt` captions, or one of the world's styles.")
                archive = gr.File(label="Dataset zip", file_types=[".zip"], type="filepath")
                dataset_name = gr.Textbox(label="Dataset name", value="my-dataset")
                upload = gr.Button("Upload dataset")
                with gr.Row():
                    style = gr.Dropdown(_styles(), value=(_styles() or [None])[0], label="World style")
                    count = gr.Number(value=16, precision=0, minimum=1, maximum=512, label="Images")
                make_style = gr.Button("Generate from style")
                dataset = gr.Textbox(label="Dataset folder (in the workspace)", elem_id="train-dataset")
                preview = gr.Gallery(label="Dataset preview", columns=8, height=140)
            with gr.Column():
                family = gr.Dropdown(services.families(), value=DEFAULT_FAMILY, label="Adapter family")
                knobs = gr.Code(json.dumps(services.family_defaults(DEFAULT_FAMILY), indent=1), language="json", label="Family knobs")
                with gr.Row():
                    name = gr.Textbox(value="my-adapter", label="Run name")
                    steps = gr.Number(value=100, precision=0, minimum=1, label="Steps")
                    learning_rate = gr.Number(value=services.family_learning_rate(DEFAULT_FAMILY), label="Learning rate")
                    batch_size = gr.Number(value=1, precision=0, minimum=1, label="Batch size")
                with gr.Row():
                    trigger = gr.Textbox(label="Trigger word")
                    sample_every = gr.Number(value=0, precision=0, minimum=0, label="Sample every (steps)")
                    sample_prompt = gr.Textbox(label="Sample prompt")
                    checkpoint_every = gr.Number(value=0, precision=0, minimum=0, label="Checkpoint every")
                with gr.Row():
                    start = gr.Button("Train", variant="primary")
                    stop = gr.Button("Stop", variant="stop")
                    resume = gr.Button("Resume")
        status = gr.Markdown(elem_id="train-status")
        with gr.Row():
            loss_plot = gr.LinePlot(None, x="step", y="loss", color="curve", color_map={"train": "#1f77b4", "validation": "#ff7f0e"}, title="Loss", height=280)
            samples = gr.Gallery(label="Samples", columns=4, height=280, elem_id="train-samples")
        result = gr.JSON(label="Result")

    upload.click(friendly(lambda path, label: _dataset(studio.upload_dataset(_need(path, "a dataset zip"), label), studio)),
                 [archive, dataset_name], [dataset, preview], api_name="upload_dataset")
    make_style.click(friendly(lambda chosen, n: _dataset(studio.style_dataset(chosen, int(n)), studio)),
                     [style, count], [dataset, preview], api_name="style_dataset")
    family.change(friendly(_family_defaults), family, [knobs, learning_rate], api_name="family_defaults")
    outputs = [status, loss_plot, samples, result]

    def train(*values, progress=gr.Progress()):
        yield from _stream(studio.train(_form(*values)), progress)

    def resume_run(run_name: str, progress=gr.Progress()):
        yield from _stream(studio.resume(run_name), progress)

    form_inputs = [name, dataset, family, knobs, steps, learning_rate, batch_size, trigger, sample_every, sample_prompt, checkpoint_every]
    start.click(friendly(train), form_inputs, outputs, api_name="train", concurrency_id="jobs", concurrency_limit=1)
    resume.click(friendly(resume_run), name, outputs, api_name="resume_training", concurrency_id="jobs", concurrency_limit=1)
    stop.click(friendly(studio.stop), None, status, api_name="stop_training", concurrency_limit=None, queue=False)
    return Tab(tab)


def _styles() -> list[str]:
    try:
        return services.world_styles()
    except Exception:  # the world room may be missing; the rest of the tab still works
        return []


def _need(value, what: str):
    if not value:
        raise ConfigError(f"no {what} given")
    return value


def _dataset(folder, studio: Studio) -> tuple[str, list[str]]:
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp", ".bmp"))
    return studio.workspace.relative(folder), [str(p) for p in images[:16]]


def _family_defaults(family: str) -> tuple[str, float]:
    return json.dumps(services.family_defaults(family), indent=1), services.family_learning_rate(family)


def _form(name, dataset, family, knobs, steps, learning_rate, batch_size, trigger, sample_every, sample_prompt, checkpoint_every) -> TrainForm:
    """The form's values as a typed TrainForm (the knobs JSON checked here)."""
    try:
        parsed = json.loads(knobs or "{}")
    except json.JSONDecodeError as error:
        raise ConfigError(f"family knobs are not valid JSON: {error}") from error
    if not isinstance(parsed, dict):
        raise ConfigError("family knobs must be a JSON object, e.g. {\"rank\": 8}")
    return TrainForm(
        name=name, dataset=dataset, family=family, knobs=parsed, steps=int(steps), learning_rate=float(learning_rate),
        batch_size=int(batch_size), trigger_word=trigger or "", sample_every=int(sample_every or 0),
        sample_prompt=sample_prompt or "", checkpoint_every=int(checkpoint_every or 0),
    )


def _stream(events, progress):
    """Turn training events into page updates: status, loss plot, samples, and the result at the end."""
    view = views.TrainView()
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
