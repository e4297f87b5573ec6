"""Know your collection, on real files: the compress report's table with every baseline.

  python benchmarks/collection_report.py assets/world/loras                 # the world zoo (28 LoRAs)
  python benchmarks/collection_report.py ../shared/loras --ks 2,4,8,16      # public SD1.5 files (those that import)

For each K: per adapter the in-sample error, leave-one-out (LOO), the mean-adapter baseline, a
random orthonormal subspace of the same K and per-adapter truncated SVD at the same numbers, then
the means, the verdict and the near-duplicate table, exactly as `studio compress` reports them
(the streaming compress runs on the files that import; the others are listed with their reason).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from studio.collection import load_collection  # noqa: E402
from studio.subspace import compress_sources, held_sources  # noqa: E402


def table(result, k: int, per_adapter: bool) -> list[str]:
    report = result.report
    lines = [f"\nK = {k}: {len(result.adapters)} adapters, {len(result.layers)} layers, file {result.bytes_out:,} bytes "
             f"(inputs {result.bytes_in:,})"]
    header = f"{'adapter':<40}{'in-sample':>10}{'LOO':>8}{'mean':>8}{'random':>8}{'SVD same bytes':>16}"
    lines += [header, "-" * len(header)]
    fmt = lambda v: f"{v:.3f}" if v is not None else "-"  # noqa: E731
    if per_adapter:
        for q in report.adapters:
            lines.append(f"{q.name[:39]:<40}{fmt(q.in_sample):>10}{fmt(q.loo):>8}{fmt(q.mean):>8}{fmt(q.random):>8}{fmt(q.svd):>16}")
    o = report.overall
    lines.append(f"{'MEAN':<40}{fmt(o['in_sample']):>10}{fmt(o['loo']):>8}{fmt(o['mean']):>8}{fmt(o['random']):>8}{fmt(o['svd']):>16}")
    lines.append(f"verdict: {report.verdict}")
    lines += [f"note: {note}" for note in result.notes]
    if report.pairs:
        lines.append("near-duplicates (weight space):")
        lines += [f"  {p.first} ~ {p.second}: cosine {p.cosine:.4f}, rel distance {p.rel_distance:.3g}, norm ratio {p.norm_ratio:.3g} ({p.kind})" for p in report.pairs[:20]]
    else:
        lines.append("near-duplicates (weight space): none with |cosine| >= 0.8")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="folder of LoRA files")
    parser.add_argument("--ks", default="2,4,8,14", help="components per layer to report, comma separated")
    parser.add_argument("--base", default=None, help="BASE to read the files against (default: the base most files fit)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--summary", action="store_true", help="means only, no per-adapter rows")
    args = parser.parse_args()
    collection = load_collection([args.folder], base=args.base)
    print(f"{args.folder}: {len(collection.adapters)} adapters for {collection.base_arch or 'an unknown base'}")
    for info in collection.infos:
        if info.error:
            print(f"  left out {Path(info.path).name}: {info.error}")
    adapters = list(collection.adapters.values())
    with tempfile.TemporaryDirectory() as folder:
        for k in (int(v) for v in args.ks.split(",")):
            started = time.perf_counter()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                result = compress_sources(held_sources(adapters), Path(folder) / f"k{k}.safetensors", k=k, device=args.device)
            print("\n".join(table(result, k, not args.summary)))
            for warning in caught:
                print(f"warning: {warning.message}")
            print(f"({time.perf_counter() - started:.1f} s)")


if __name__ == "__main__":
    main()
