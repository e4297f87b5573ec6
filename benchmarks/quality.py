"""The quality table: every family trained on styles the zoo's subspace never saw, same data and seeds.

Hold out a few zoo styles; compress the other zoo LoRAs into a collection (``compress(k=K)``);
render each held-out style with the world's own renderer into an image + .txt caption folder;
train every family on it through the one training loop (``studio.train.loop.train``) with the
same seed, steps, batch and validation pairs; read the loop's validation loss (fixed noise, fixed
timesteps, evaluated every ``--eval-every`` steps) and the wall time per step.

    python benchmarks/quality.py --device cuda        # full size: 4 styles x 7 rows, 300 steps, batch 16, bf16
    python benchmarks/quality.py --quick              # CPU smoke: 2 styles, 24 steps, batch 4 (< 3 min)
    python benchmarks/quality.py --styles polka --rows lora,unilora --steps 10

Learning rates (AdamW, constant, no warmup, the same for every style; flags --lr-*): LoRA 2e-3
(the zoo LoRAs' own), EigenLoRAx 1e-2, SuperLoRA 1e-2, Uni-LoRA 2e-2. On CPU torch runs one
thread unless --threads says otherwise (tiny matmuls thrash with more on a shared machine).

Columns: trainable numbers; final validation loss; gain = base loss - final loss (base = no
adapter: the LoRA run's step-0 validation loss, where B = 0); gain as % of LoRA's gain; steps to
reach 95% of LoRA's final gain ("never" if no evaluation reached it); median ms per step.

Targets (from the issue; printed as met / not met beside the numbers):
- EigenLoRAx: >= 95% of LoRA's gain, >= 100x fewer trainable numbers, <= 0.5x LoRA's steps to 95%;
- SuperLoRA and Uni-LoRA: within 5% of LoRA's gain (>= 95%) at <= 10% of its trainable numbers.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DEFAULT_STYLES = "polka,sepia,mosaic,inked"
QUICK_STYLES = "polka,sepia"
ALL_ROWS = ("lora", "eigenlora", "eigenlora-aug", "superlora-g8", "superlora-lonkr", "superlora-tucker", "unilora")


@dataclass
class RowSpec:
    """One table row: a family, its knobs and its learning rate (the same for every style)."""

    key: str
    label: str
    family: str
    knobs: dict
    learning_rate: float
    kind: str  # "lora" | "eigenlora" | "superlora" | "unilora": which target applies


@dataclass
class Run:
    """One (row, style) training run: what the loop reported."""

    row: str
    style: str
    parameters: int
    status: str
    validation: dict[int, float]
    step_ms: float
    seconds: float
    messages: list[str] = field(default_factory=list)

    @property
    def final(self) -> float:
        return self.validation[max(self.validation)] if self.validation else float("nan")


# ---------------------------------------------------------------- data and subspace


def render_style(style, index: int, folder: Path, n_train: int, n_val: int, seed: int, size: int) -> Path:
    """Write one style's rendered train + validation pairs (png + .txt, trigger first) to ``folder``.

    Train and validation scenes come from the world's two distinct scene seeds of that style
    (``heldout`` False / True); the loop's seeded ``validation_split`` holds out ``n_val`` pairs.
    """
    from PIL import Image

    from studio.world.data import style_split

    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for heldout, count, prefix in ((False, n_train, "t"), (True, n_val, "v")):
        images, captions = style_split(style, index, count, seed, heldout, size)
        for i, (image, caption) in enumerate(zip(images, captions)):
            stem = folder / f"{prefix}{i:05d}"
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(stem.with_suffix(".png"))
            stem.with_suffix(".txt").write_text(caption, encoding="utf-8")
    return folder


def build_subspace(zoo: Path, holdout: list[str], k: int, output: Path) -> dict:
    """Compress every zoo LoRA except the held-out styles (the streaming compress, k=K); report the energy."""
    from studio.collection import load_collection
    from studio.subspace import compress_sources, held_sources

    collection = load_collection([zoo])
    errors = [info.error for info in collection.infos if info.error]
    if errors:
        raise SystemExit("zoo: " + "; ".join(errors))
    missing = sorted(set(holdout) - set(collection.adapters))
    if missing:
        raise SystemExit(f"held-out styles {missing} are not in the zoo {zoo} ({sorted(collection.adapters)})")
    kept = [adapter for name, adapter in sorted(collection.adapters.items()) if name not in holdout]
    started = time.perf_counter()
    result = compress_sources(held_sources(kept), output, k=k)
    curves = result.explained
    at_k = [(down[min(k, len(down)) - 1] + up[min(k, len(up)) - 1]) / 2 for down, up in curves.values()]
    k90 = [max(_first_at(down, 0.9), _first_at(up, 0.9)) for down, up in curves.values()]
    return {
        "adapters": [a.name for a in kept], "held_out": holdout, "k": k, "path": str(output),
        "layers": len(curves), "energy_at_k_mean": statistics.mean(at_k), "energy_at_k_min": min(at_k),
        "k_for_energy_0.9_mean": statistics.mean(k90), "k_for_energy_0.9_max": max(k90),
        "rel_error_mean": statistics.mean(a.rel_error for a in result.adapters), "seconds": time.perf_counter() - started,
    }


def _first_at(curve: list[float], level: float) -> int:
    return next((i + 1 for i, value in enumerate(curve) if value >= level), len(curve))


# ---------------------------------------------------------------- rows and runs


def row_specs(args, collection: Path, lora_parameters: int) -> list[RowSpec]:
    """The table's rows; Uni-LoRA's d is the largest that stays <= ``--unilora-share`` of LoRA's numbers."""
    r, k, p = args.rank, args.k, args.augment
    d = max(1, int(lora_parameters * args.unilora_share))
    specs = [
        RowSpec("lora", f"LoRA r={r}", "lora", {"rank": r, "alpha": r}, args.lr_lora, "lora"),
        RowSpec("eigenlora", f"EigenLoRAx K={k} r={r}", "eigenlora", {"collection": str(collection), "k": k, "rank": r}, args.lr_eigen, "eigenlora"),
        RowSpec("eigenlora-aug", f"EigenLoRAx K={k}+P={p} r={r}", "eigenlora", {"collection": str(collection), "k": k, "augment": p, "rank": r}, args.lr_eigen, "eigenlora"),
        RowSpec("superlora-g8", "SuperLoRA G=8 r=4", "superlora", {"groups": 8, "rank": 4, "alpha": 4}, args.lr_super, "superlora"),
        RowSpec("superlora-lonkr", "SuperLoRA LoNKr G=8 K=2 r=4", "superlora", {"groups": 8, "splits": 2, "rank": 4, "alpha": 4}, args.lr_super, "superlora"),
        RowSpec("superlora-tucker", "SuperLoRA Tucker G=8 M=3 rho=0.5 r=4", "superlora", {"groups": 8, "order": 3, "rho": 0.5, "rank": 4, "alpha": 4}, args.lr_super, "superlora"),
        RowSpec("unilora", f"Uni-LoRA d={d} r={r}", "unilora", {"d": d, "rank": r, "alpha": r}, args.lr_uni, "unilora"),
    ]
    wanted = [key.strip() for key in args.rows.split(",") if key.strip()]
    unknown = sorted(set(wanted) - set(ALL_ROWS))
    if unknown:
        raise SystemExit(f"--rows: unknown {unknown}; known: {', '.join(ALL_ROWS)}")
    if "lora" not in wanted:
        raise SystemExit("--rows must include lora (every percentage is relative to it)")
    return [spec for spec in specs if spec.key in wanted]


def lora_parameter_count(rank: int) -> int:
    from studio.adapters import registry
    from studio.bases import module_tree

    adapter = registry.build_adapter("lora", registry.make_config("lora", {"rank": rank, "alpha": rank}), module_tree("world"))
    return sum(p.numel() for p in adapter.parameters() if p.requires_grad)


def train_one(spec: RowSpec, style: str, data: Path, output: Path, args) -> Run:
    """One run through the studio's training loop; validation from its Progress events."""
    from studio.events import Done, Message, Progress
    from studio.train.config import TrainConfig
    from studio.train.loop import train

    if output.exists():
        shutil.rmtree(output)
    config = TrainConfig(
        base="world", data=str(data), output_dir=str(output), family=spec.family, adapter=dict(spec.knobs),
        name=f"{spec.key}-{style}", steps=args.steps, batch_size=args.batch, learning_rate=spec.learning_rate,
        lr_schedule="constant", lr_warmup_steps=0, mixed_precision=args.precision, seed=args.seed,
        validation_split=args.val_images / (args.train_images + args.val_images), validation_every=args.eval_every,
        checkpoint_every=0, export_format="none", tensorboard=False,
    )
    started = time.perf_counter()
    last, deltas, messages, result = None, [], [], None
    for event in train(config):
        now = time.perf_counter()
        if isinstance(event, Progress) and event.stage == "train":
            if last is not None and "val_loss" not in event.metrics and event.step > 2:
                deltas.append(now - last)  # a step without a validation pass inside it
            last = now
        elif isinstance(event, Message):
            messages.append(event.text)
            if event.level in ("warning", "error"):
                print(f"    [{event.level}] {event.text}", flush=True)
        elif isinstance(event, Done):
            result = event.result
    seconds = time.perf_counter() - started
    step_ms = statistics.median(deltas) * 1000 if deltas else float("nan")
    return Run(spec.key, style, result.parameters, result.status, dict(sorted(result.validation.items())), step_ms, seconds, messages)


# ---------------------------------------------------------------- the table


def steps_to(curve: dict[int, float], threshold: float) -> int | None:
    """First evaluated step whose validation loss is <= threshold (None: never)."""
    return next((step for step, value in sorted(curve.items()) if step > 0 and value <= threshold), None)


def mean_curve(runs: list[Run]) -> dict[int, float]:
    steps = set.intersection(*(set(run.validation) for run in runs))
    return {step: statistics.mean(run.validation[step] for run in runs) for step in sorted(steps)}


def summarize(specs: list[RowSpec], runs: dict[tuple[str, str], Run], styles: list[str]) -> dict:
    """Per style and averaged: every row's numbers and the target checks."""
    groups = {style: {spec.key: runs[spec.key, style] for spec in specs} for style in styles}
    blocks = {}
    for style, by_row in groups.items():
        blocks[style] = _block(specs, {key: run.validation for key, run in by_row.items()},
                               {key: run.parameters for key, run in by_row.items()}, {key: run.step_ms for key, run in by_row.items()},
                               {key: run.status for key, run in by_row.items()})
    curves = {spec.key: mean_curve([groups[s][spec.key] for s in styles]) for spec in specs}
    params = {spec.key: groups[styles[0]][spec.key].parameters for spec in specs}
    ms = {spec.key: statistics.mean(groups[s][spec.key].step_ms for s in styles) for spec in specs}
    status = {spec.key: ",".join(sorted({groups[s][spec.key].status for s in styles})) for spec in specs}
    blocks["mean"] = _block(specs, curves, params, ms, status)
    blocks["mean"]["note"] = "loss columns and steps from the mean validation curve over the held-out styles"
    return blocks


def _block(specs: list[RowSpec], curves: dict[str, dict[int, float]], params: dict[str, int], ms: dict[str, float], status: dict[str, str]) -> dict:
    lora = curves["lora"]
    base = lora[0]  # LoRA at step 0 has B = 0: exactly the base model
    lora_final = lora[max(lora)]
    lora_gain = base - lora_final
    threshold = base - 0.95 * lora_gain
    lora_steps = steps_to(lora, threshold) if lora_gain > 0 else None
    rows = {}
    for spec in specs:
        curve = curves[spec.key]
        final = curve[max(curve)]
        gain = base - final
        share = gain / lora_gain if lora_gain > 0 else float("nan")
        steps = steps_to(curve, threshold) if lora_gain > 0 else None
        rows[spec.key] = {
            "label": spec.label, "family": spec.family, "parameters": params[spec.key], "final_loss": final, "gain": gain,
            "gain_share": share, "steps_to_95": steps, "step_ms": ms[spec.key], "status": status[spec.key],
            "fewer_than_lora": params["lora"] / params[spec.key], "checks": _checks(spec, params[spec.key], params["lora"], share, steps, lora_steps),
        }
    return {"base_loss": base, "lora_gain": lora_gain, "threshold_95": threshold, "lora_steps_to_95": lora_steps, "rows": rows}


def _checks(spec: RowSpec, params: int, lora_params: int, share: float, steps: int | None, lora_steps: int | None) -> dict[str, bool]:
    if spec.kind == "eigenlora":
        return {
            "gain >= 95% of LoRA": share >= 0.95,
            ">= 100x fewer numbers": lora_params / params >= 100,
            "<= 0.5x LoRA's steps": steps is not None and lora_steps is not None and steps <= 0.5 * lora_steps,
        }
    if spec.kind in ("superlora", "unilora"):
        return {"gain >= 95% of LoRA": share >= 0.95, "<= 10% of LoRA's numbers": params <= 0.1 * lora_params}
    return {}


def _fmt_steps(steps: int | None) -> str:
    return "never" if steps is None else str(steps)


def markdown(summary: dict, specs: list[RowSpec], styles: list[str], info: dict) -> str:
    lines = [f"### Quality table ({info['device']}, {info['precision']}; {info['steps']} steps, batch {info['batch']}, "
             f"validation every {info['eval_every']} steps on {info['val_images']} held-out pairs; seed {info['seed']})", ""]
    lines.append(f"Held-out styles (not in the subspace): {', '.join(styles)}. Subspace: {len(info['subspace']['adapters'])} zoo LoRAs, "
                 f"K={info['subspace']['k']} per layer (explained energy at K: mean {info['subspace']['energy_at_k_mean']:.2f}, "
                 f"min {info['subspace']['energy_at_k_min']:.2f}; K for 0.9 energy: mean {info['subspace']['k_for_energy_0.9_mean']:.1f}, "
                 f"max {info['subspace']['k_for_energy_0.9_max']}). Learning rates (AdamW, constant, same for every style): "
                 + ", ".join(f"{spec.label}: {spec.learning_rate:g}" for spec in specs) + ".")
    lines.append("")
    for block_name in styles + ["mean"]:
        block = summary[block_name]
        title = "Mean over held-out styles" if block_name == "mean" else f"Style `{block_name}`"
        lines.append(f"#### {title}: base validation loss (no adapter) {block['base_loss']:.5f}; LoRA reaches 95% of its gain at step "
                     f"{_fmt_steps(block['lora_steps_to_95'])}")
        lines.append("")
        lines.append("| row | trainable | x fewer than LoRA | final val loss | gain | % of LoRA gain | steps to 95% of LoRA gain | ms/step | targets |")
        lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---|")
        lines.append(f"| base (no adapter) | 0 | - | {block['base_loss']:.5f} | 0 | 0% | - | - | |")
        for spec in specs:
            row = block["rows"][spec.key]
            checks = "; ".join(f"{name}: {'met' if ok else 'NOT met'}" for name, ok in row["checks"].items())
            if row["status"] != "done":
                checks = (checks + "; " if checks else "") + f"run status {row['status']}"
            lines.append(f"| {row['label']} | {row['parameters']:,} | {row['fewer_than_lora']:.1f} | {row['final_loss']:.5f} | {row['gain']:.5f} | "
                         f"{100 * row['gain_share']:.1f}% | {_fmt_steps(row['steps_to_95'])} | {row['step_ms']:.1f} | {checks} |")
        lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------- main


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CPU smoke size: 2 styles, few steps, small data (< 3 min on 2 cores)")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    parser.add_argument("--precision", choices=("auto", "no", "bf16", "fp16"), default="auto", help="auto: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--styles", default=None, help=f"held-out zoo styles, comma-separated (default {DEFAULT_STYLES}; --quick {QUICK_STYLES})")
    parser.add_argument("--rows", default=",".join(ALL_ROWS), help=f"rows to run (lora required): {','.join(ALL_ROWS)}")
    parser.add_argument("--steps", type=int, default=None, help="training steps per run (default 300; --quick 24)")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default 16; --quick 4)")
    parser.add_argument("--eval-every", type=int, default=None, help="validation every N steps (default 15; --quick 6)")
    parser.add_argument("--train-images", type=int, default=None, help="rendered train pairs per style (default 512; --quick 24)")
    parser.add_argument("--val-images", type=int, default=None, help="rendered validation pairs per style (default 64; --quick 8)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank; also EigenLoRAx loadings rank and Uni-LoRA rank")
    parser.add_argument("--k", type=int, default=14, help="EigenLoRAx components per layer from the zoo subspace")
    parser.add_argument("--augment", type=int, default=4, help="P extra random components for the augmented EigenLoRAx row")
    parser.add_argument("--unilora-share", type=float, default=0.1, help="Uni-LoRA d as a share of LoRA's trainable numbers")
    parser.add_argument("--lr-lora", type=float, default=2e-3, help="LoRA learning rate (2e-3: the zoo LoRAs' own)")
    parser.add_argument("--lr-eigen", type=float, default=1e-2)
    parser.add_argument("--lr-super", type=float, default=1e-2)
    parser.add_argument("--lr-uni", type=float, default=2e-2)
    parser.add_argument("--zoo", default=None, help="folder of zoo LoRAs (default assets/world/loras)")
    parser.add_argument("--work", default="runs/quality", help="data, collection and run folders")
    parser.add_argument("--out", default="runs/quality/table.md", help="markdown table file (a .json with every number is written beside it)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 1 on CPU: tiny matmuls thrash with more on a shared machine)")
    args = parser.parse_args(argv)
    quick = {"styles": QUICK_STYLES, "steps": 24, "batch": 4, "eval_every": 6, "train_images": 24, "val_images": 8}
    full = {"styles": DEFAULT_STYLES, "steps": 300, "batch": 16, "eval_every": 15, "train_images": 512, "val_images": 64}
    for name, value in (quick if args.quick else full).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; print the markdown table last; return the JSON summary."""
    args = parse(argv)
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before anything touches CUDA: the loop picks the device itself
    import torch

    if args.device == "cpu" and torch.cuda.is_available():
        raise SystemExit("--device cpu: CUDA was initialised before the script could hide it; run with CUDA_VISIBLE_DEVICES=''")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    previous_threads = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(args.threads or 1)
    try:
        return _run(args, device, torch)
    finally:
        torch.set_num_threads(previous_threads)


def _run(args, device: str, torch) -> dict:
    from studio.bases import world_dir
    from studio.train.session import precision
    from studio.train.config import TrainConfig
    from studio.world.styles import load_styles

    try:
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.disable_progress_bar()
        diffusers_logging.set_verbosity_error()
    except ImportError:
        pass
    started = time.perf_counter()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    styles = [s.strip() for s in args.styles.split(",") if s.strip()]
    zoo = Path(args.zoo) if args.zoo else world_dir() / "loras"
    all_styles = {style.name: (i, style) for i, style in enumerate(load_styles(world_dir() / "styles.toml"))}
    unknown = sorted(set(styles) - set(all_styles))
    if unknown:
        raise SystemExit(f"--styles: unknown {unknown}")
    prec = precision(TrainConfig(base="world", data=".", output_dir=".", mixed_precision=args.precision))
    print(f"quality: device {device}, precision {prec}, held-out styles {styles}, {args.steps} steps, batch {args.batch}", flush=True)

    subspace = build_subspace(zoo, styles, args.k, work / "zoo-heldout.eigen.safetensors")
    print(f"subspace: {len(subspace['adapters'])} LoRAs, K={args.k}, energy at K {subspace['energy_at_k_mean']:.3f} "
          f"(K for 0.9 energy: mean {subspace['k_for_energy_0.9_mean']:.1f}) in {subspace['seconds']:.1f} s", flush=True)
    lora_parameters = lora_parameter_count(args.rank)
    specs = row_specs(args, Path(subspace["path"]), lora_parameters)
    size = _image_size()
    runs: dict[tuple[str, str], Run] = {}
    for done, style in enumerate(styles):
        if done:
            elapsed = time.perf_counter() - started
            print(f"  {elapsed:.0f} s so far; about {elapsed / done * len(styles):.0f} s in all", flush=True)
        index, style_obj = all_styles[style]
        data = render_style(style_obj, index, work / "data" / style, args.train_images, args.val_images, args.seed + 1, size)
        for spec in specs:
            run = train_one(spec, style, data, work / "runs" / style / spec.key, args)
            runs[spec.key, style] = run
            print(f"  {style:<10} {spec.label:<38} {run.parameters:>9,} numbers  val {run.validation[0]:.5f} -> {run.final:.5f}  "
                  f"{run.step_ms:7.1f} ms/step  {run.seconds:5.1f} s  {run.status}", flush=True)
    summary = summarize(specs, runs, styles)
    info = {
        "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "precision": prec, "steps": args.steps,
        "batch": args.batch, "eval_every": args.eval_every, "train_images": args.train_images, "val_images": args.val_images,
        "seed": args.seed, "styles": styles, "subspace": subspace, "seconds": time.perf_counter() - started,
        "rows": [asdict(spec) for spec in specs], "lora_parameters": lora_parameters, "quick": args.quick,
    }
    table = markdown(summary, specs, styles, info)
    result = {"info": info, "table": summary, "runs": [asdict(run) for run in runs.values()], "markdown": table}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table + "\n", encoding="utf-8")
    out.with_suffix(".json").write_text(json.dumps(_plain(result), indent=1), encoding="utf-8")
    print(f"total {info['seconds']:.0f} s; wrote {out} and {out.with_suffix('.json')}\n", flush=True)
    print(table, flush=True)
    return result


def _image_size() -> int:
    """The world's pixel size (the VAE's sample_size)."""
    from studio.bases import world_dir

    config = json.loads((world_dir() / "vae" / "config.json").read_text())
    return int(config.get("sample_size", 64))


def _plain(value):
    """JSON-able: non-finite floats become null, keys strings."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


if __name__ == "__main__":
    main()
    raise SystemExit(0)
