"""``studio serve``: the web app on the embedded world (or another base), on 127.0.0.1.

    studio serve
    studio serve --base path/to/pipeline --port 7861 --workspace runs/my-workspace

Every button calls the same functions the CLI calls; every action has a named API endpoint
(see the page's "Use via API" link, or `gradio_client`). Files are read from and served out of
the workspace only.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``serve`` on the CLI's subparsers."""
    parser = subparsers.add_parser("serve", help="the web app (Gradio): collection, subspace, train, generate",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="world", help="world | diffusers folder | .safetensors checkpoint | hub id")
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--workspace", type=Path, default=Path("runs/studio-workspace"), help="the only folder the app reads and serves")
    parser.add_argument("--zoo", type=Path, default=None, help="adapter folder imported at start (default: the world's LoRAs)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    parser.add_argument("--max-upload-mb", type=int, default=256, help="largest upload accepted")
    return parser


def run(args: argparse.Namespace) -> int:
    """Start the app and block until interrupted."""
    from studio.app.server import start
    from studio.app.services import AppConfig

    config = AppConfig(base=args.base, workspace=args.workspace, zoo=args.zoo, device=args.device, max_file_size=args.max_upload_mb << 20)
    if args.host not in ("127.0.0.1", "localhost"):
        print(f"warning: serving on {args.host}: anyone who can reach this machine can use the studio")
    print(f"Adapter Studio on http://{args.host}:{args.port} (workspace {config.workspace.resolve()})")
    start(config, args.host, args.port, block=True)
    return 0
