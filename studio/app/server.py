"""Build and start the studio web app: the tabs over one `Studio`, Gradio's queue, safe serving.

- Binds to 127.0.0.1 unless told otherwise.
- Serves files only from the workspace: Gradio's upload / cache folder is moved inside it and it
  is the only allowed path; everything handlers return lies there.
- Uploads are capped (``max_file_size``); adapter files are read by the safetensors-only readers.
- The queue runs one long job (compress, train) and one generation at a time; the engine's lock
  serializes switch-and-generate per pipeline; several browser tabs share one studio.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import gradio as gr

from studio.app.services import AppConfig, Studio
from studio.app.tabs import base, collection, generate, subspace, train

TITLE = "Adapter Studio"


@dataclass
class Running:
    """A started app: the Blocks, the studio behind it and the URL it answers on."""

    blocks: gr.Blocks
    studio: Studio
    url: str

    def close(self) -> None:
        self.blocks.close()


def build_app(studio: Studio) -> gr.Blocks:
    """The Blocks of every tab; the page load and each tab's selection refresh what it shows."""
    with gr.Blocks(title=TITLE, analytics_enabled=False) as blocks:
        gr.Markdown(f"# {TITLE}\nLoRA adapters on diffusers: import, compress, train, generate. "
                    f"Workspace: `{studio.workspace.root}`")
        with gr.Tabs():
            tabs = [collection.build(studio), subspace.build(studio), train.build(studio), generate.build(studio), base.build(studio)]
        for tab in tabs:
            if tab.refresh is not None:
                tab.tab.select(tab.refresh, None, tab.outputs, api_visibility="private", queue=False)
                blocks.load(tab.refresh, None, tab.outputs, api_visibility="private", queue=False)
    blocks.queue(default_concurrency_limit=2)
    return blocks


def use_workspace_cache(studio: Studio) -> None:
    """Put Gradio's upload and result cache inside the workspace (before the Blocks exist)."""
    os.environ["GRADIO_TEMP_DIR"] = str(studio.workspace.folder("cache"))


def start(config: AppConfig, host: str = "127.0.0.1", port: int = 7860, block: bool = False) -> Running:
    """Create the studio (base loaded, zoo imported), build the app and serve it."""
    studio = Studio(config)
    use_workspace_cache(studio)
    studio.start()
    blocks = build_app(studio)
    _, url, _ = blocks.launch(
        server_name=host, server_port=port, prevent_thread_lock=not block, max_file_size=config.max_file_size,
        allowed_paths=[str(studio.workspace.root)], show_error=True, quiet=True, footer_links=["api"], ssr_mode=False,
    )
    return Running(blocks, studio, url)
