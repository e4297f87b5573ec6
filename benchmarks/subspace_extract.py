"""Benchmark EigenLoRAx extraction: ours (canonical, uncentred, Gram eigh) vs the reference
procedure (centred, d x d covariance, general eig), on SDXL UNet attention-projection shapes.

  python benchmarks/subspace_extract.py --device cuda            # 20 rank-32 LoRAs, sampled layers
  python benchmarks/subspace_extract.py --device cpu --quick     # small, CPU-friendly
  python benchmarks/subspace_extract.py --device cuda --max-layers 12 --profile   # + per-phase times
  python benchmarks/subspace_extract.py --shapes 20x640x640,20x1280x2048 --max-layers 8 --profile  # CPU, no diffusers
  python benchmarks/subspace_extract.py --zoo assets/world/loras # quality table on real files
  python benchmarks/subspace_extract.py --make-zoo /tmp/zoo      # write synthetic SD1.5 files to try --zoo

Synthetic LoRAs share a 48-dimensional subspace per layer plus a common mean direction and 5 %
noise, so K matters and the centred reference's missing mean shows. Both methods are timed on the
same layers, on the same device, in the same run; the table gives ratios against the reference.
The reference's general eig of d x d matrices is slow (d = 1280..2048), so it runs on an evenly
spaced sample of layers (--max-layers); ours is also timed on every layer of the UNet.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from studio.adapters.lora import LoraAdapter, LoraLayer  # noqa: E402
from studio.subspace.collection import CompressedCollection, LayerShape  # noqa: E402
from studio.subspace.extract import SubspaceSpec  # noqa: E402
from studio.subspace.verbs import (  # noqa: E402
    AdapterRecord, collection_factors, compress_sources, fit_subspaces, leave_one_out, pack_loadings, reconstruct_all, reconstruction_errors,
)

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


class _Held:
    def __init__(self, adapter: LoraAdapter) -> None:
        self.adapter, self.name = adapter, adapter.name

    def load(self) -> LoraAdapter:
        return self.adapter

    def sha256(self) -> str:
        return ""

    def nbytes(self) -> int:
        return sum(l.down.nbytes + l.up.nbytes for l in self.adapter.lora_layers.values())


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
            streamed = compress_sources([_Held(a) for a in adapters], Path(folder) / "stream.safetensors", k=args.k, device=args.device)
        _sync(args.device)
        rows["ours, streaming + file"] = (time.perf_counter() - start, streamed.bytes_out, sum(a.rel_error for a in streamed.adapters) / len(streamed.adapters))
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
    from studio.subspace.verbs import adapter_files

    adapters = [load_adapter(path) for path in adapter_files([folder])]
    ranks = sorted({r for a in adapters for r in a.ranks})
    print(f"\nzoo {folder}: {len(adapters)} LoRAs, ranks {ranks}, {len({l for a in adapters for l in a.layers()})} layers")
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
    parser.add_argument("--profile", action="store_true", help="per-phase times: canonical / gram+eigh / projection / file")
    parser.add_argument("--shapes", help="synthetic layers instead of SDXL's, e.g. 20x640x640,20x1280x2048 (count x out x in)")
    parser.add_argument("--skip-speed", action="store_true", help="only the zoo table")
    args = parser.parse_args()
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
