"""Generate tab: prompt and options, adapters by name (instant switching), mixing, per-image
adapters, same-seed comparison grids; one progress bar and an Interrupt button; labelled images,
uncropped grids, "reuse parameters" from a PNG, and PNGs that carry their parameters."""

from __future__ import annotations

import time
from types import SimpleNamespace

import gradio as gr

from studio.app.forms import GenerateForm, SwitchForm
from studio.app.services import Studio
from studio.app.tabs import Tab
from studio.app.wiring import form_of, friendly, named
from studio.engine.schedulers import SCHEDULERS
from studio.errors import Interrupted, StudioError

MODES = [("mix into one", "mix"), ("one adapter per image", "per_image"), ("same-seed comparison grid", "grid")]
POLL_SECONDS = 0.25
REUSED = ["prompt", "negative_prompt", "adapters", "weights", "mode", "seed", "steps", "guidance", "width", "height", "scheduler"]


def build(studio: Studio) -> Tab:
    """Lay out the tab (the form, the results, the gallery) and wire it to `studio.generation`."""
    generation = studio.generation
    with gr.Tab("Generate", id="generate", elem_id="tab-generate") as tab:
        with gr.Row(equal_height=False):
            form = _form_column(studio)
            out = _results_column()
        out.history = gr.Gallery(label="Gallery (workspace outputs)", columns=8, height=220, format="png", object_fit="contain")
        refresh_gallery = gr.Button("Refresh gallery", size="sm")
    _wire(studio, form, out)
    refresh_gallery.click(lambda: [str(p) for p in generation.gallery()], None, out.history, api_name="gallery")
    return Tab(tab, lambda: (gr.Dropdown(choices=["none", *studio.names()]), [str(p) for p in generation.gallery()]),
               [form.adapters, out.history])


def _form_column(studio: Studio) -> SimpleNamespace:
    """Prompt, adapters and weights, mode, the sampling numbers (starting at the form's defaults), Generate / Interrupt."""
    c, defaults, limits = SimpleNamespace(), GenerateForm(prompt=""), studio.config.limits
    with gr.Column(scale=2, min_width=320):
        c.prompt = gr.Textbox(label="Prompt", value="a red circle on a white background", lines=2)
        c.negative = gr.Textbox(value=defaults.negative_prompt, label="Negative prompt")
        with gr.Row(equal_height=False):
            c.adapters = gr.Dropdown(["none"], value=[], multiselect=True, allow_custom_value=True, label="Adapters", elem_id="generate-adapters",
                                     min_width=200, info="picking one merges it at once (instant switching)", scale=2)
            c.weights = gr.Textbox(value="", label="Weights", placeholder="1, 0.5", info="one per adapter", min_width=100, scale=1)
        with gr.Row(equal_height=False):
            c.mode = gr.Radio(MODES, value=defaults.mode, label="Mode", scale=2, min_width=200)
            c.strength = gr.Slider(0.0, 2.0, value=defaults.strength, step=0.05, label="Strength", min_width=160, scale=1)
        with gr.Row(equal_height=False):
            c.seed = gr.Number(value=defaults.seed, precision=0, label="Seed", info="-1: random", min_width=90)
            c.steps = gr.Number(value=defaults.steps, precision=0, label="Steps", info=f"1..{limits.max_steps}", min_width=90)
            c.guidance = gr.Number(value=defaults.guidance, label="CFG scale", info="0: the base's usual", min_width=90)
            c.batch = gr.Number(value=defaults.batch, precision=0, label="Batch", info=f"1..{limits.max_batch}", min_width=90)
        with gr.Row(equal_height=False):
            c.width = gr.Number(value=defaults.width, precision=0, step=8, label="Width", info="0: native", min_width=90)
            c.height = gr.Number(value=defaults.height, precision=0, step=8, label="Height", info="0: native", min_width=90)
            c.scheduler = gr.Dropdown(["default", *SCHEDULERS], value=defaults.scheduler, label="Scheduler", min_width=120)
        with gr.Row():
            c.run = gr.Button("Generate", variant="primary", elem_id="generate-run")
            c.interrupt = gr.Button("Interrupt", variant="stop", elem_id="generate-interrupt")
        c.status = gr.Markdown(elem_id="generate-status")
        c.interrupt_note = gr.Markdown(elem_id="generate-interrupt-note")  # apart from the status: never overwrites the result
        with gr.Accordion("Reuse parameters from a PNG", open=False):
            c.reuse_file = gr.File(label="A PNG the studio (or A1111) made", file_types=[".png"], type="filepath", height=100)
    return c


def _results_column() -> SimpleNamespace:
    c = SimpleNamespace()
    with gr.Column(scale=3, min_width=320):
        c.images = gr.Gallery(label="Images", columns=2, height="auto", elem_id="generate-images", format="png", object_fit="contain",
                              preview=False, allow_preview=True)
        c.infotext = gr.Textbox(label="Parameters (written into each PNG)", lines=3, elem_id="generate-infotext")
        c.files = gr.File(label="Download PNGs", file_count="multiple", interactive=False)
        c.summary = gr.JSON(label="Summary", visible=False)
    return c


def _wire(studio: Studio, form: SimpleNamespace, out: SimpleNamespace) -> None:
    """Generate (with progress and Interrupt), switch on picking an adapter, reuse a PNG's parameters."""
    generation = studio.generation
    inputs = named(GenerateForm, prompt=form.prompt, negative_prompt=form.negative, adapters=form.adapters, weights=form.weights,
                   mode=form.mode, strength=form.strength, seed=form.seed, steps=form.steps, guidance=form.guidance, batch=form.batch,
                   width=form.width, height=form.height, scheduler=form.scheduler)

    def make(request: gr.Request, progress=gr.Progress(), **values):
        following = generation.start(form_of(GenerateForm, values, "generate"), _session(request))
        while not following.future.done():
            time.sleep(POLL_SECONDS)
            if following.total:
                progress((following.done, following.total), desc="denoising")
                yield (f"denoising: step {following.done} / {following.total}",) + (gr.skip(),) * 5
        try:
            done = following.future.result()
        except Interrupted:
            stopped = {"images": 0, "interrupted": True, "step": following.done, "total": following.total}
            yield (interrupted_text(following), gr.skip(), gr.skip(), gr.skip(), stopped, gr.skip())
            return
        paths = [str(p) for p in done.paths]
        summary_value = {"images": len(paths), "sizes": [list(s) for s in done.sizes], "seconds": done.seconds,
                         "files": [p.name for p in done.paths], "labels": done.labels}
        note = f"{len(paths)} image(s) in {done.seconds:.2f} s"
        yield note, list(zip(paths, done.labels)), "\n\n".join(done.infotexts), paths, summary_value, [str(p) for p in generation.gallery()]

    def switch_to(**values):
        picked = form_of(SwitchForm, values, "switch")
        return switched(studio, picked.adapters[0] if picked.adapters else "none", picked.strength)

    def interrupt_mine(request: gr.Request) -> str:
        count = generation.interrupt(_session(request))
        return "interrupting at the next denoising step ..." if count else "nothing of yours is generating"

    form.run.click(friendly(make), inputs_kwargs=inputs, outputs=[form.status, out.images, out.infotext, out.files, out.summary, out.history],
                   api_name="generate", concurrency_id="generate", concurrency_limit=16, show_progress_on=[form.status])
    form.interrupt.click(interrupt_mine, None, form.interrupt_note, api_name="interrupt", queue=False)
    form.run.click(lambda: "", None, form.interrupt_note, api_visibility="private", queue=False)
    form.adapters.input(friendly(switch_to), inputs_kwargs=named(SwitchForm, adapters=form.adapters, strength=form.strength),
                        outputs=form.status, api_name="switch_adapter", show_progress="hidden")
    reused_outputs = [form.prompt, form.negative, form.adapters, form.weights, form.mode, form.seed, form.steps, form.guidance, form.width,
                      form.height, form.scheduler, form.status]
    form.reuse_file.upload(friendly(lambda path: reused(studio, path)), form.reuse_file, reused_outputs, api_name="reuse_parameters")


def interrupted_text(following) -> str:
    """What the status says after Interrupt (as A1111: the job ends, nothing half-made is kept)."""
    where = f" at step {following.done} / {following.total}" if following.total else " before the first step"
    return f"**Interrupted**{where}; nothing was saved. Generate again when ready."


def _session(request: gr.Request | None) -> str:
    return getattr(request, "session_hash", None) or ""


def switched(studio: Studio, name: str, strength: float = 1.0) -> str:
    """Merge one registered adapter (or 'none') into the live weights; how long it took."""
    from studio.engine import check_name

    from studio.errors import LimitError

    engine = studio.require_engine()
    cap = studio.config.limits.max_weight
    if not abs(strength) <= cap:
        raise LimitError(f"switch: strength = {strength:g}: must be a finite number within +-{cap:g} (limits.max_weight)")
    if name != "none":
        check_name(name)
        if name not in studio.names():
            raise StudioError(f"no adapter named {name!r} in the collection")
    started = time.perf_counter()
    engine.activate(name if name != "none" else None, strength)
    return f"switched to `{name}` (strength {strength:g}) in {(time.perf_counter() - started) * 1000:.1f} ms"


def reused(studio: Studio, path: str | None):
    """The form filled in from a PNG's parameters; adapters not in the collection are named."""
    if not path:
        return (gr.skip(),) * 12
    values = studio.generation.reuse(path)
    known = set(studio.names()) | {"none"}
    missing = [name for name in values["adapters"] if name not in known]
    values["adapters"] = [name for name in values["adapters"] if name in known]
    note = "parameters taken from the PNG" + (f"; not in the collection: {', '.join(missing)}" if missing else "")
    return (*(values[key] for key in REUSED), note)
