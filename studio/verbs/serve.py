"""`studio serve`: the web app (`studio.app`) on the embedded world (or another base), on 127.0.0.1.

Every button and API endpoint builds the same requests the command line builds and calls the same
verbs; files are read from and served out of the workspace only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from studio.errors import PathError
from studio.events import Done, Event, Message
from studio.options import check as check_fields
from studio.options import Cli, option
from studio.verbs import checks
from studio.verbs.generate import SERVING_MAX_SECONDS

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
MAX_UPLOAD_MB = 1 << 16
MAX_PORT = 65535


@dataclass
class ServeRequest:
    """Where the app serves, over which base and workspace."""

    base: str | None = option(None, "BASE: world, a diffusers folder, a .safetensors checkpoint, a hub id (default: the base the "
                              "workspace used last, else world)")
    host: str = option("127.0.0.1", "interface to bind (default 127.0.0.1: this machine only)")
    port: int = option(7860, "port to answer on", minimum=1, maximum=MAX_PORT)
    workspace: str = option("runs/studio-workspace", "the only folder the app reads and serves", cli=Cli(metavar="DIR"))
    zoo: str | None = option(None, "adapter folder imported at start (default: the world's LoRAs)", cli=Cli(metavar="DIR"))
    device: str | None = option(None, "cpu, cuda, cuda:N (default: cuda when available)")
    max_upload_mb: int = option(256, "largest upload accepted, in MB", minimum=1, maximum=MAX_UPLOAD_MB)
    max_seconds: float = option(SERVING_MAX_SECONDS, "refuse a generation the engine estimates to take longer (it holds the engine for "
                                "every client; 0: no limit)", minimum=0)


def check(request: ServeRequest) -> None:
    """Every field; the workspace is a folder (or can be made), the zoo exists."""
    check_fields(request, "serve")
    checks.device("device", request.device)
    if not request.host.strip():
        raise PathError("serve: host: give an interface to bind (e.g. 127.0.0.1)")
    checks.output_folder("workspace", request.workspace)
    if request.zoo is not None:
        checks.existing_folder("zoo", request.zoo)


def run(request: ServeRequest) -> Iterator[Event]:
    """Start the app and serve until interrupted (Ctrl-C)."""
    from studio.app.server import start
    from studio.app.services import AppConfig
    from studio.verbs.generate import Limits

    check(request)
    config = AppConfig(base=request.base, workspace=Path(request.workspace), zoo=Path(request.zoo) if request.zoo else None,
                       device=request.device, max_file_size=request.max_upload_mb << 20, limits=Limits(max_seconds=request.max_seconds))
    if request.host not in LOCAL_HOSTS:
        yield Message(f"serving on {request.host}: anyone who can reach this machine can use the studio", "warning")
    yield Message(f"Adapter Studio on http://{request.host}:{request.port} (workspace {config.workspace.resolve()})")
    start(config, request.host, request.port, block=True)
    yield Done(None)
