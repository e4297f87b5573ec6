"""``studio generate``: images from a base and adapters, with their parameters in the PNG.

    studio generate --base world --prompt "a red circle on a white background" --seed 0 -o out.png
    studio generate --base world --prompt P --adapter a.safetensors:0.8 --adapter b.safetensors -o mix.png
    studio generate --base world --prompt P --per-image --adapter a.safetensors --adapter none -o each.png
    studio generate --base world --prompt P --grid --adapter none --adapter a.safetensors -o grid.png

A thin caller of ``studio.engine.generate`` / ``comparison_grid``: imports stay lazy so that
``--help`` and argument errors answer at once.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``generate`` on the CLI's subparsers."""
    parser = subparsers.add_parser("generate", help="generate images with adapters (merged, mixed, per image, grid)",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="world", help="world | diffusers folder | .safetensors checkpoint | hub id")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--negative-prompt", default="")
    parser.add_argument("--adapter", action="append", default=[], metavar="SPEC",
                        help="FILE[:weight] or COLLECTION.safetensors#NAME[:weight]; repeat to mix ('none': no adapter)")
    parser.add_argument("--per-image", action="store_true", help="each image of the batch gets its own --adapter")
    parser.add_argument("--grid", action="store_true", help="a labelled same-seed grid, one cell per --adapter")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=None, help="CFG scale (default: 4 for the world, else 7.5)")
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--scheduler", default=None, help="ddim, euler, euler_a, dpm++, dpm++_karras, pndm, lms, heun, unipc, ddpm")
    parser.add_argument("--batch", type=int, default=1, help="images in one batch (seeds seed, seed+1, ...)")
    parser.add_argument("--scale", type=float, default=1.0, help="overall adapter strength")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's own)")
    parser.add_argument("-o", "--output", required=True, type=Path, help="OUT.png (a batch writes OUT-0.png, OUT-1.png, ...)")
    return parser


def output_paths(output: Path, count: int) -> list[Path]:
    """OUT.png for one image, OUT-0.png ... for several."""
    if count == 1:
        return [output]
    return [output.with_name(f"{output.stem}-{i}{output.suffix or '.png'}") for i in range(count)]


def run(args: argparse.Namespace) -> int:
    """Generate and save; errors the studio raises on purpose become one line and exit code 2."""
    from studio.errors import StudioError

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        return _generate(args)
    except StudioError as error:
        print(f"studio generate: {error}", file=sys.stderr)
        return 2


def _generate(args: argparse.Namespace) -> int:
    from studio.engine import GenerateRequest, comparison_grid, generate

    request = GenerateRequest(
        prompt=args.prompt, base=args.base, negative_prompt=args.negative_prompt, adapters=list(args.adapter),
        per_image=args.per_image, seed=args.seed, steps=args.steps, guidance=args.guidance, width=args.width,
        height=args.height, scheduler=args.scheduler, batch=args.batch, scale=args.scale, device=args.device, dtype=args.dtype,
    )
    if args.grid:
        saved = [comparison_grid(request).save(args.output)]
    else:
        images = generate(request)
        saved = [image.save(path) for image, path in zip(images, output_paths(args.output, len(images)))]
    for path in saved:
        print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run ``generate`` on its own (``python -m studio.commands.generate ...``)."""
    parser = argparse.ArgumentParser(prog="studio")
    add_parser(parser.add_subparsers(dest="command", required=True))
    return run(parser.parse_args(["generate", *(sys.argv[1:] if argv is None else argv)]))


if __name__ == "__main__":
    sys.exit(main())
