"""Benchmark `studio compress` as users run it, plus labelled in-memory kernel rows.

What `studio compress` runs (the default): LoRA files with real base shapes and random factors are
written to disk first (once, reused), then `python -m studio compress DIR -o OUT --k K --json` is
timed as a whole subprocess under /usr/bin/time -v (wall, CPU, peak RSS of the process):

  python benchmarks/subspace_extract.py --files sd15 --n 6 --rank 16             # 2-core CPU target: <= 30 s, <= 1.5 GB
  python benchmarks/subspace_extract.py --files locon --n 2 --rank 16            # SD1.5 LoCon (3x3 convs, in up to 11,520)
  python benchmarks/subspace_extract.py --device cuda --files sdxl --n 20 --rank 32    # GPU target: <= 10 s
  python benchmarks/subspace_extract.py --device cuda --files sd15 --n 1000 --rank 16  # GPU target: >= 30 files/s, bounded RSS
  python benchmarks/subspace_extract.py --device cuda --files sdxl --n 20 --rank 32 --profile  # where the command's time goes

In-memory kernel rows (NOT what the command runs: adapters already in memory, the test oracle's
Gram path vs the reference procedure, no file reading, no second pass, no report):

  python benchmarks/subspace_extract.py --kernel --device cuda            # 20 rank-32 LoRAs, sampled SDXL layers
  python benchmarks/subspace_extract.py --kernel --device cpu --quick     # small, CPU-friendly
  python benchmarks/subspace_extract.py --kernel --shapes 20x640x640,20x1280x2048 --max-layers 8 --profile
  python benchmarks/subspace_extract.py --zoo assets/world/loras          # quality table on real files (oracle, in memory)
  python benchmarks/subspace_extract.py --make-zoo /tmp/zoo               # write synthetic SD1.5 files to try --zoo

Kernel rows: synthetic LoRAs share a 48-dimensional subspace per layer plus a common mean
direction and 5 % noise, so K matters and the centred reference's missing mean shows. Both methods
are timed on the same layers, on the same device, in the same run; the table gives ratios against
the reference. The reference's general eig of d x d matrices is slow (d = 1280..2048), so it runs on
an evenly spaced sample of layers (--max-layers).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from studio.adapters.lora import LoraAdapter, LoraLayer  # noqa: E402
from studio.subspace import compress_sources, held_sources  # noqa: E402
from studio.subspace.collection import AdapterRecord, CompressedCollection, LayerShape, pack_loadings  # noqa: E402
from studio.subspace.extract import SubspaceSpec  # noqa: E402
from studio.subspace.oracle import fit_subspaces, leave_one_out, reconstruction_errors  # noqa: E402
from studio.subspace.reconstruct import collection_factors, reconstruct_all  # noqa: E402

SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280), layers_per_block=2, transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
)
PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")
ZOO_KS = (2, 4, 8, 14, 24)


def sdxl_attention_shapes() -> dict[str, tuple[int, int]]:
    """``{unet.<module>: (out, in)}`` of every attention projection, from a weightless SDXL UNet."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET)
    return {
        f"unet.{name}": (module.out_features, module.in_features)
        for name, module in unet.named_modules()
        if isinstance(module, torch.nn.Linear) and ".attn" in name and name.endswith(PROJECTIONS)
    }


def sample_layers(shapes: dict, count: int, max_dim: int | None) -> dict:
    names = [n for n, (o, i) in shapes.items() if max_dim is None or max(o, i) <= max_dim]
    if count and count < len(names):
        names = [names[round(j * (len(names) - 1) / (count - 1))] for j in range(count)] if count > 1 else names[:1]
    return {n: shapes[n] for n in names}


def synthetic_loras(shapes: dict, count: int, rank: int, seed: int = 0, dtype=torch.float16) -> list[LoraAdapter]:
    """LoRAs sharing a 48-dim subspace + a mean direction per layer, with 5 % noise (fp16 like real files)."""
    shared = torch.Generator().manual_seed(seed)
    structure = {}
    for name, (n_out, n_in) in shapes.items():
        structure[name] = (torch.randn(48, n_in, generator=shared) / n_in**0.5, torch.randn(n_out, 48, generator=shared) / 48**0.5,
                           torch.randn(n_in, generator=shared) / n_in**0.5, torch.randn(n_out, generator=shared))
    adapters = []
    for j in range(count):
        generator = torch.Generator().manual_seed(seed + 1 + j)
        layers = {}
        for name, (n_out, n_in) in shapes.items():
            down_basis, up_basis, down_mean, up_mean = structure[name]
            down = torch.randn(rank, 48, generator=generator) @ down_basis + 2 * down_mean + 0.05 * torch.randn(rank, n_in, generator=generator) / n_in**0.5
            up = up_basis @ torch.randn(48, rank, generator=generator) + up_mean[:, None] + 0.05 * torch.randn(n_out, rank, generator=generator)
            layers[name] = LoraLayer(down.to(dtype), (0.01 * up).to(dtype), float(rank))
        adapters.append(LoraAdapter(f"synthetic_{j:02d}", layers))
    return adapters


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


PHASES: dict[str, dict[str, float]] = {}  # label -> phase -> seconds, filled by timed_method


def timed_method(adapters: list[LoraAdapter], k: int, method: str, device: str, label: str | None = None) -> tuple[float, dict, list]:
    """Extraction + projection time, the layer subspaces and the per-adapter reconstructions.

    Per-phase times (canonical / gram+eigh / projection, device-synchronised) go to PHASES[label]."""
    phases, clock = {}, [time.perf_counter()]

    def lap(phase: str) -> None:
        _sync(device)
        clock.append(time.perf_counter())
        phases[phase] = clock[-1] - clock[-2]

    _sync(device)
    clock[0] = time.perf_counter()
    factors = collection_factors(adapters, method == "ours", device)
    lap("canonical" if method == "ours" else "factors")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layers = fit_subspaces(factors, SubspaceSpec(k=k), method)
    lap("gram+eigh" if method == "ours" else "cov+eig")
    rebuilt = reconstruct_all(factors, layers)
    lap("projection")
    PHASES[label or method] = phases
    return clock[-1] - clock[0], layers, rebuilt


def collection_bytes(adapters: list[LoraAdapter], layers: dict, rebuilt: list, folder: Path, label: str) -> int:
    """Size of the collection file the method's components and loadings make (same format for both)."""
    cpu_layers = {n: type(s)(s.down_components.cpu(), s.up_components.cpu(), s.down_explained.cpu(), s.up_explained.cpu(), s.requested_k, s.principal_k) for n, s in layers.items()}
    shapes = {n: LayerShape.of(adapters[0].lora_layers[n]) for n in layers}
    records = [AdapterRecord(a.name, ranks={n: l.rank for n, l in a.lora_layers.items()}, rel_error=r.total.relative) for a, r in zip(adapters, rebuilt)]
    flats = [pack_loadings(r.loadings, list(layers)) for r in rebuilt]
    collection = CompressedCollection(cpu_layers, shapes, [r.summary() for r in records], "sdxl", {}, None, records, flats)
    return collection.save(folder / f"{label}.safetensors").stat().st_size


def custom_shapes(text: str) -> dict[str, tuple[int, int]]:
    """``{layer: (out, in)}`` from "20x640x640,20x1280x2048" (count x out x in per group)."""
    shapes = {}
    for group, spec in enumerate(text.split(",")):
        count, n_out, n_in = (int(v) for v in spec.split("x"))
        shapes |= {f"unet.group{group}.layer{i}.to_q": (n_out, n_in) for i in range(count)}
    return shapes


def speed_table(args) -> None:
    shapes = custom_shapes(args.shapes) if args.shapes else sdxl_attention_shapes()
    sample = sample_layers(shapes, args.max_layers, 640 if args.quick else None)
    print("IN-MEMORY KERNEL ROWS (adapters already in memory; `studio compress` is timed by --files)")
    print(f"SDXL UNet: {len(shapes)} attention projections; timing both methods on {len(sample)} of them; "
          f"{args.n} rank-{args.rank} LoRAs, K={args.k}, device {args.device}")
    adapters = synthetic_loras(sample, args.n, args.rank)
    original = sum(l.down.nbytes + l.up.nbytes for a in adapters for l in a.lora_layers.values())
    timed_method(adapters[:2], args.k, "ours", args.device)  # warm-up (kernels, allocator)
    rows = {}
    with tempfile.TemporaryDirectory() as folder:
        for method in ("reference", "ours"):
            seconds, layers, rebuilt = timed_method(adapters, args.k, method, args.device)
            errors = [r.total.relative for r in rebuilt]
            start = time.perf_counter()
            size = collection_bytes(adapters, layers, rebuilt, Path(folder), method)
            PHASES[method]["file"] = time.perf_counter() - start
            rows[method] = (seconds, size, sum(errors) / len(errors))
        _sync(args.device)
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            streamed = compress_sources(held_sources(adapters), Path(folder) / "stream.safetensors", k=args.k, device=args.device)
        _sync(args.device)
        rows["compress_sources (held)"] = (time.perf_counter() - start, streamed.bytes_out, sum(a.rel_error for a in streamed.adapters) / len(streamed.adapters))
    ref_seconds, ref_bytes, ref_error = rows["reference"]
    header = f"{'method':<24}{'seconds':>10}{'x ref time':>12}{'file bytes':>14}{'/ original':>12}{'/ ref file':>12}{'mean rel err':>14}{'/ ref err':>11}"
    print(f"\noriginal LoRAs (fp16): {original:,} bytes\n{header}\n{'-' * len(header)}")
    for method, (seconds, size, error) in rows.items():
        print(f"{method:<24}{seconds:>10.3f}{seconds / ref_seconds:>12.3f}{size:>14,}{size / original:>12.4f}{size / ref_bytes:>12.4f}{error:>14.3e}{error / max(ref_error, 1e-30):>11.3f}")
    if not args.quick and len(sample) < len(shapes):
        full = synthetic_loras(shapes, args.n, args.rank)
        seconds, layers, rebuilt = timed_method(full, args.k, "ours", args.device, f"ours, all {len(shapes)} layers")
        size = sum(l.down.nbytes + l.up.nbytes for a in full for l in a.lora_layers.values())
        per_layer_ref = ref_seconds / len(sample)
        print(f"\nours on all {len(shapes)} layers: {seconds:.2f} s, mean rel err {sum(r.total.relative for r in rebuilt) / len(rebuilt):.3e} "
              f"(reference extrapolated: ~{per_layer_ref * len(shapes):.0f} s; originals {size:,} bytes)")
    if args.profile:
        print("\nper-phase seconds (device-synchronised; file = writing the collection, not in 'seconds' above)")
        for label, phases in PHASES.items():
            print(f"  {label:<28}" + "  ".join(f"{phase} {value:.3f}" for phase, value in phases.items()))


def zoo_table(folder: Path, device: str) -> None:
    from studio.formats import load_adapter
    from studio.subspace.sources import adapter_files

    adapters = [load_adapter(path) for path in adapter_files([folder])]
    ranks = sorted({r for a in adapters for r in a.ranks})
    print(f"\nIN-MEMORY ORACLE: zoo {folder}: {len(adapters)} LoRAs, ranks {ranks}, {len({l for a in adapters for l in a.layers()})} layers")
    header = f"{'K':>4}{'ours err':>12}{'ref err':>12}{'ours/ref':>10}{'LOO ours':>12}{'LOO ref':>12}"
    print(f"{header}\n{'-' * len(header)}")
    for k in ZOO_KS:
        mean = lambda values: sum(values) / len(values)  # noqa: E731
        ours, ref = mean(reconstruction_errors(adapters, k, "ours", device=device)), mean(reconstruction_errors(adapters, k, "reference", device=device))
        loo_ours = mean(leave_one_out(adapters, k=k, method="ours", device=device)) if len(adapters) > 1 else float("nan")
        loo_ref = mean(leave_one_out(adapters, k=k, method="reference", device=device)) if len(adapters) > 1 else float("nan")
        print(f"{k:>4}{ours:>12.4f}{ref:>12.4f}{ours / max(ref, 1e-30):>10.3f}{loo_ours:>12.4f}{loo_ref:>12.4f}")


def make_zoo(folder: Path, count: int = 8) -> None:
    """Synthetic SD1.5 LoRA files (kohya layout) that studio.formats reads, to try --zoo."""
    from studio.formats import save_adapter

    block = "unet.down_blocks.0.attentions.0.transformer_blocks.0"
    shapes = {f"{block}.attn1.{p}": (320, 320) for p in PROJECTIONS} | {f"{block}.attn2.to_k": (320, 768), f"{block}.attn2.to_v": (320, 768)}
    folder.mkdir(parents=True, exist_ok=True)
    for adapter in synthetic_loras(shapes, count, rank=8, seed=7):
        save_adapter(adapter, folder / f"{adapter.name}.safetensors", format="kohya")
    print(f"wrote {count} synthetic SD1.5 LoRAs to {folder}")


# ---------------------------------------------------------------- what `studio compress` runs

ARCH_OF = {"sd15": "sd15", "locon": "sd15", "sdxl": "sdxl"}
LOCON_MAX_IN = 1280  # LoCon 3x3 convs with at most this many input channels (flattened in = 2,880 .. 11,520)


def target_shapes(kind: str) -> dict[str, tuple[int, ...]]:
    """``{unet.<module>: weight shape}``: attention projections (sd15, sdxl), plus 3x3 resnet /
    sampler convs for LoCon, from the base's weightless module tree."""
    from studio.bases import module_tree

    tree = module_tree(ARCH_OF[kind])
    shapes = {n: m.weight_shape for n, m in tree.modules.items() if n.startswith("unet.") and ".attn" in n and n.endswith(PROJECTIONS)}
    if kind == "locon":
        shapes |= {
            n: m.weight_shape for n, m in tree.modules.items()
            if n.startswith("unet.") and m.kind == "conv" and m.weight_shape[2:] == (3, 3) and 4 < m.weight_shape[1] <= LOCON_MAX_IN and n.split(".")[-1] in ("conv1", "conv2", "conv")
        }
    return shapes


def random_lora(name: str, shapes: dict, rank: int, conv_rank: int, seed: int) -> LoraAdapter:
    """Random fp16 factors (down ~ N(0, 1/in), up ~ N(0, 1e-4)) on the given modules, alpha = rank / 2."""
    generator = torch.Generator().manual_seed(seed)
    layers = {}
    for module, shape in shapes.items():
        r = conv_rank if len(shape) == 4 else rank
        n_in = int(torch.tensor(shape[1:]).prod())
        down = torch.randn(r, *shape[1:], generator=generator) / n_in**0.5
        up = 0.01 * torch.randn(shape[0], r, *((1, 1) if len(shape) == 4 else ()), generator=generator)
        layers[module] = LoraLayer(down.half(), up.half(), r / 2)
    return LoraAdapter(name, layers, {"ss_network_dim": str(rank), "ss_network_alpha": str(rank / 2)})


def write_files(kind: str, count: int, rank: int, conv_rank: int, folder: Path) -> list[Path]:
    """``count`` kohya files of ``kind`` in ``folder`` (kept and reused when already there)."""
    from studio.formats import save_adapter

    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{kind}_r{rank}_{j:04d}.safetensors" for j in range(count)]
    missing = [p for p in paths if not p.exists()]
    if missing:
        shapes = target_shapes(kind)
        started = time.perf_counter()
        for path in missing:
            save_adapter(random_lora(path.stem, shapes, rank, conv_rank, seed=int(path.stem.rsplit("_", 1)[1])), path)
        print(f"wrote {len(missing)} {kind} files ({len(shapes)} layers each) to {folder} in {time.perf_counter() - started:.1f} s", flush=True)
    return paths


def _time_v(stderr: str) -> dict:
    found = {}
    for key, pattern in (("rss_kb", r"Maximum resident set size \(kbytes\): (\d+)"), ("user", r"User time \(seconds\): ([\d.]+)"), ("sys", r"System time \(seconds\): ([\d.]+)")):
        match = re.search(pattern, stderr)
        found[key] = float(match.group(1)) if match else float("nan")
    return found


def time_compress(folder: Path, output: Path, k: int, device: str, extra: list[str], profile: Path | None = None) -> dict:
    """Run `python -m studio compress FOLDER -o OUTPUT --k K --device D --json` as a whole process
    (under cProfile, writing ``profile``, when given: the numbers then include its overhead)."""
    command = [sys.executable, "-m", "studio", "compress", str(folder), "-o", str(output), "--k", str(k), "--device", device, "--json", *extra]
    if profile is not None:
        command[1:1] = ["-m", "cProfile", "-o", str(profile)]
    timed = ["/usr/bin/time", "-v", *command] if Path("/usr/bin/time").exists() else command
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    output.unlink(missing_ok=True)
    started = time.perf_counter()
    done = subprocess.run(timed, capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"studio compress failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return {"wall": wall, "command": " ".join(command[1:]), "result": json.loads(done.stdout), **_time_v(done.stderr)}


def files_table(args) -> None:
    folder = args.folder or Path(tempfile.gettempdir()) / "studio-bench" / f"{args.files}-r{args.rank}"
    paths = write_files(args.files, args.n, args.rank, args.conv_rank, folder)
    run_folder = folder / f"run-{args.n}" if len(list(folder.glob("*.safetensors"))) != args.n else folder
    if run_folder != folder:  # the folder holds more files than asked for: link the first n into a subfolder
        run_folder.mkdir(exist_ok=True)
        for path in paths:
            link = run_folder / path.name
            if not link.exists():
                os.link(path, link)
    size = sum(p.stat().st_size for p in paths)
    output = Path(tempfile.gettempdir()) / "studio-bench" / f"out-{args.files}-{args.n}.safetensors"
    print(f"\nWHAT `studio compress` RUNS: {args.n} {args.files} rank-{args.rank} files ({size / 1e6:,.0f} MB) on {args.device}", flush=True)
    header = f"{'run':>4}{'wall s':>9}{'files/s':>9}{'MB/s':>8}{'CPU s':>8}{'peak RSS GB':>13}{'mean err':>10}  verdict"
    print(f"{header}\n{'-' * len(header)}")
    for run in range(1, args.repeat + 1):
        profile = output.with_suffix(f".run{run}.prof") if args.profile else None
        found = time_compress(run_folder, output, args.k, args.device, args.extra.split() if args.extra else [], profile)
        result = found["result"]
        errors = [a["rel_error"] for a in result["adapters"]]
        verdict = (result.get("report") or {}).get("verdict", "")
        print(f"{run:>4}{found['wall']:>9.2f}{args.n / found['wall']:>9.1f}{size / 1e6 / found['wall']:>8.1f}{found['user'] + found['sys']:>8.1f}"
              f"{found['rss_kb'] / 2**20:>13.2f}{sum(errors) / len(errors):>10.3e}  {verdict}", flush=True)
    print(f"command: {found['command']}")
    if args.profile:
        print_profile(profile)


def print_profile(path: Path, count: int = 30) -> None:
    """The main thread's heaviest functions of the last profiled run (loader / hash threads are not
    in a cProfile profile), by cumulative and by own time."""
    import pstats

    print(f"\nprofile of the last run (main thread): {path}")
    for key in ("cumulative", "tottime"):
        print(f"-- by {key}")
        pstats.Stats(str(path)).sort_stats(key).print_stats(count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="6 rank-8 LoRAs on 4 small layers (CPU in seconds)")
    parser.add_argument("--n", type=int, default=20, help="number of synthetic LoRAs")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--k", type=int, default=14)
    parser.add_argument("--max-layers", type=int, default=24, help="layers both methods are timed on (0: all)")
    parser.add_argument("--zoo", type=Path, help="folder of LoRA files: quality table at K = 2, 4, 8, 14, 24")
    parser.add_argument("--make-zoo", type=Path, help="write synthetic SD1.5 LoRA files there and exit")
    parser.add_argument("--profile", action="store_true", help="--kernel: per-phase times (canonical / gram+eigh / projection / file); "
                        "--files: run the command under cProfile and print its heaviest functions")
    parser.add_argument("--shapes", help="synthetic layers instead of SDXL's, e.g. 20x640x640,20x1280x2048 (count x out x in)")
    parser.add_argument("--skip-speed", action="store_true", help="only the zoo table")
    parser.add_argument("--files", choices=sorted(ARCH_OF), help="write files of this kind and time `studio compress` on them (the default: sd15)")
    parser.add_argument("--kernel", action="store_true", help="the in-memory kernel table instead of the command")
    parser.add_argument("--conv-rank", type=int, default=8, help="rank of LoCon conv layers (--files locon)")
    parser.add_argument("--folder", type=Path, help="where the files are written (default: $TMPDIR/studio-bench/KIND-rRANK)")
    parser.add_argument("--repeat", type=int, default=1, help="timed runs of the command")
    parser.add_argument("--extra", default="", help="extra arguments for `studio compress`, e.g. '--stats-dtype float32'")
    args = parser.parse_args()
    if not args.kernel and not args.zoo and not args.make_zoo:
        args.files = args.files or "sd15"
    if args.files:
        if args.device == "cuda" and not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device visible")
        files_table(args)
        return
    if args.make_zoo:
        make_zoo(args.make_zoo)
        return
    if args.quick:
        args.n, args.rank, args.max_layers = min(args.n, 6), min(args.rank, 8), min(args.max_layers or 4, 4)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible")
    if not args.skip_speed:
        speed_table(args)
    if args.zoo:
        zoo_table(args.zoo, args.device)


if __name__ == "__main__":
    main()
