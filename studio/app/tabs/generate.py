"""Generate tab: prompt and options, adapters by name (instant switching), mixing, per-image
adapters, same-seed comparison grids, a gallery, and PNGs that carry their parameters."""

from __future__ import annotations

import gradio as gr

from studio.app.services import GenerateForm, Studio
from studio.app.tabs import Tab
from studio.app.wiring import float_list, friendly, optional_float, optional_int

MODES = {"mix into one": "mix", "one adapter per image": "per_image", "same-seed comparison grid": "grid"}
SCHEDULERS = ["default", "ddim", "euler", "euler_a", "dpm++", "dpm++_karras", "pndm", "lms", "heun", "unipc", "ddpm"]


def build(studio: Studio) -> Tab:
    """Lay out the tab and wire it to `Studio.switch` / `generate` / `gallery`."""
    with gr.Tab("Generate", id="generate", elem_id="tab-generate") as tab:
        with gr.Row():
            with gr.Column(scale=2):
                prompt = gr.Textbox(label="Prompt", value="a red circle on a white background", lines=2)
                negative = gr.Textbox(label="Negative prompt")
                with gr.Row():
                    adapters = gr.Dropdown(["none"], value=[], multiselect=True, allow_custom_value=True, label="Adapters", elem_id="generate-adapters")
                    weights = gr.Textbox(label="Weights (one per adapter)", placeholder="1, 0.5")
                    strength = gr.Slider(0.0, 2.0, value=1.0, step=0.05, label="Strength")
                mode = gr.Radio(list(MODES), value="mix into one", label="Mode")
                with gr.Row():
                    seed = gr.Number(value=0, precision=0, label="Seed")
                    steps = gr.Number(value=20, precision=0, minimum=1, label="Steps")
                    guidance = gr.Number(value=0, minimum=0, label="CFG scale (0: the base's usual)")
                    batch = gr.Number(value=1, precision=0, minimum=1, maximum=16, label="Batch")
                with gr.Row():
                    width = gr.Number(value=0, precision=0, minimum=0, step=8, label="Width (0: native)")
                    height = gr.Number(value=0, precision=0, minimum=0, step=8, label="Height (0: native)")
                    scheduler = gr.Dropdown(SCHEDULERS, value="default", label="Scheduler")
                with gr.Row():
                    switch = gr.Button("Switch adapter")
                    run = gr.Button("Generate", variant="primary")
                status = gr.Markdown(elem_id="generate-status")
            with gr.Column(scale=3):
                images = gr.Gallery(label="Images", columns=4, height=400, elem_id="generate-images", format="png", preview=True, object_fit="contain")
                infotext = gr.Textbox(label="Parameters (written into each PNG)", lines=3)
                files = gr.File(label="Download PNGs", file_count="multiple", interactive=False)
                summary = gr.JSON(label="Summary")
        history = gr.Gallery(label="Gallery (workspace outputs)", columns=8, height=220, format="png", object_fit="contain")
        refresh_gallery = gr.Button("Refresh gallery")

    def switch_to(chosen: list[str], scale: float) -> str:
        name = (chosen or ["none"])[0]
        seconds = studio.switch(name, float(scale))
        return f"switched to `{name}` (strength {float(scale):g}) in {seconds * 1000:.1f} ms"

    def make(text, neg, chosen, weight_text, scale, mode_label, seed_value, steps_value, cfg, batch_value, w, h, sched):
        form = GenerateForm(
            prompt=text, adapters=list(chosen or []), weights=float_list(weight_text), mode=MODES[mode_label],
            negative_prompt=neg or "", strength=float(scale), seed=int(seed_value or 0), steps=int(steps_value),
            guidance=optional_float(cfg), batch=int(batch_value or 1), width=optional_int(w), height=optional_int(h),
            scheduler=None if sched in (None, "default") else sched,
        )
        done = studio.generate(form)
        paths = [str(p) for p in done.paths]
        summary_value = {"images": len(paths), "sizes": [list(s) for s in done.sizes], "seconds": done.seconds, "files": [p.name for p in done.paths]}
        note = f"{len(paths)} image(s) in {done.seconds:.2f} s"
        return paths, "\n\n".join(done.infotexts), paths, summary_value, note, [str(p) for p in studio.gallery()]

    switch.click(friendly(switch_to), [adapters, strength], status, api_name="switch_adapter", concurrency_id="engine", concurrency_limit=1)
    adapters.change(friendly(switch_to), [adapters, strength], status, api_visibility="private", concurrency_id="engine", concurrency_limit=1)
    inputs = [prompt, negative, adapters, weights, strength, mode, seed, steps, guidance, batch, width, height, scheduler]
    run.click(friendly(make), inputs, [images, infotext, files, summary, status, history], api_name="generate",
              concurrency_id="engine", concurrency_limit=1)
    refresh_gallery.click(lambda: [str(p) for p in studio.gallery()], None, history, api_name="gallery")
    return Tab(tab, lambda: (gr.Dropdown(choices=["none", *studio.names()]), [str(p) for p in studio.gallery()]), [adapters, history])
