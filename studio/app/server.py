"""Build and start the studio web app: the tabs over one `Studio`, Gradio's queue, safe serving.

- Binds to 127.0.0.1 unless told otherwise.
- Serves files only from the workspace: Gradio's upload / cache folder is moved inside it and it
  is the only allowed path; everything handlers return lies there.
- Uploads are capped (``max_file_size``); adapter files are read by the safetensors-only readers.
- The queue runs one long job (compress, train) at a time; generations from several clients run
  side by side and meet in the engine's request batcher (per-image batches); the engine's lock
  serializes its pipeline; several browser tabs share one studio.
- The page watches the server: when it stops answering (stopped, or killed for memory) a banner
  says so at once instead of a job that seems to run forever.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import gradio as gr

from studio.app.services import AppConfig, Studio
from studio.app.tabs import base, collection, generate, subspace, train

TITLE = "Adapter Studio"
HEARTBEAT_MS = 2000
LOST_AFTER = 2  # failed heartbeats in a row before the banner shows

# A heartbeat on the page: the config endpoint answers while the server lives.
HEAD = f"""
<script>
(() => {{
  let failures = 0, lost = false;
  const banner = () => {{
    let node = document.getElementById("backend-lost");
    if (!node) {{
      node = document.createElement("div");
      node.id = "backend-lost";
      node.setAttribute("role", "alert");
      document.body.appendChild(node);
    }}
    return node;
  }};
  const base = () => window.location.origin + window.location.pathname.replace(/\\/+$/, "");
  async function beat() {{
    try {{
      const response = await fetch(base() + "/config", {{cache: "no-store"}});
      if (!response.ok) throw new Error(String(response.status));
      failures = 0;
      if (lost) {{
        banner().innerHTML = 'The studio server answers again, but what was running is gone: <a href="">reload the page</a>.';
        banner().className = "back";
      }}
    }} catch (error) {{
      failures += 1;
      if (failures >= {LOST_AFTER}) {{
        lost = true;
        banner().textContent = "Lost the connection to the studio server: it stopped or was killed (for example out of memory). " +
          "Jobs in progress are lost; start `studio serve` again and reload this page.";
        banner().className = "lost";
      }}
    }}
  }}
  setInterval(beat, {HEARTBEAT_MS});
}})();
</script>
"""

CSS = """
#backend-lost { position: fixed; top: 0; left: 0; right: 0; z-index: 10000; padding: 10px 16px; font-weight: 600; }
#backend-lost.lost { background: #b91c1c; color: white; }
#backend-lost.back { background: #facc15; color: black; }
#backend-lost a { color: inherit; text-decoration: underline; }
#collection-table table { font-size: 0.9em; }
@media (max-width: 600px) {
  .gradio-container { padding: 4px !important; }
  /* a phone: the collection table keeps readable columns and scrolls sideways inside its box */
  #collection-table .table-container { overflow-x: auto !important; }
  #collection-table .table-wrap { min-width: 540px !important; }
  .tab-container button, .tab-wrapper button { padding: 6px 8px !important; }
  table { font-size: 0.8em !important; }
}
"""


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
        gr.Markdown(f"# {TITLE}\nLoRA adapters on diffusers: import, compress, train, generate. Workspace: `{studio.workspace.root}`")
        with gr.Tabs():
            tabs = [collection.build(studio), subspace.build(studio), train.build(studio), generate.build(studio), base.build(studio)]
        for tab in tabs:
            if tab.refresh is not None:
                tab.tab.select(tab.refresh, tab.inputs or None, tab.outputs, api_visibility="private", queue=False)
                blocks.load(tab.refresh, tab.inputs or None, tab.outputs, api_visibility="private", queue=False)
    blocks.queue(default_concurrency_limit=2)
    return blocks


def use_workspace_cache(studio: Studio) -> None:
    """Put Gradio's upload and result cache inside the workspace (before the Blocks exist)."""
    os.environ["GRADIO_TEMP_DIR"] = str(studio.workspace.folder("cache"))


def start(config: AppConfig, host: str = "127.0.0.1", port: int = 7860, block: bool = False) -> Running:
    """Create the studio (its workspace restored, or the zoo imported), build the app and serve it."""
    studio = Studio(config)
    use_workspace_cache(studio)
    studio.start()
    blocks = build_app(studio)
    _, url, _ = blocks.launch(
        server_name=host, server_port=port, prevent_thread_lock=not block, max_file_size=config.max_file_size,
        allowed_paths=[str(studio.workspace.root)], show_error=True, quiet=True, footer_links=["api"], ssr_mode=False,
        head=HEAD, css=CSS,
    )
    return Running(blocks, studio, url)
