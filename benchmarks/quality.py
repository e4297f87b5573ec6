"""The training quality table, judged by the pictures: every family trained by the studio's loop
on world styles the zoo's subspace never saw, then generating same-seed images that the world's
pixel judge scores, beside the validation losses.

    python benchmarks/quality.py --device cuda --out runs/quality     # every table, one H200: a few minutes
    python benchmarks/quality.py --quick                                # CPU smoke size (a few minutes on 2 cores)
    python benchmarks/quality.py --tables families --styles polka --rows lora,unilora

Tables (``--tables``, comma-separated):
- ``issue``: the training issue's own runs re-measured (pinstripe, 64 rendered pairs, rank 4,
  alpha 4): the app's old defaults, batch 8, the zoo's settings, the CLI's old default, each with
  the old objective (plain noise MSE, constant learning rate) and the new one (the ``sampler``
  timestep weighting, cosine schedule), and the new family defaults.
- ``sweep``: LoRA learning rate x loss weighting at the default batch and steps, on two styles:
  the measurements behind the family defaults.
- ``convergence``: LoRA and EigenLoRAx (zero and mean starts) with a validation every 15 steps:
  the steps each needs to reach 95% of LoRA's validation gain (the EigenLoRAx paper's claim: half).
- ``families``: every family at its defaults on the held-out styles, with the EigenLoRAx
  initialisations and the controls the collection issue asks for: the same K on a random
  orthonormal subspace, and the collection's mean adapter alone (no training).

Image columns (``studio/world/quality.py``; 32 evaluation prompts, 20 DDIM steps, CFG 4, the same
seeds for every row): style score (0 = the base's images, 1 = moved by the full plain-to-styled
change the world's renderer makes; below 0 = further than the base from it, e.g. noise), and
caption following kept (of the prompts the base gets right, the share still right with the
adapter, read by the judge seen through the style). Targets (training issue): style score >= 0.9x
the zoo LoRA's, caption following >= 90% of the base's. Loss columns: validation loss (fixed noise,
8 fixed timesteps over the whole range) at step 0 and at the end. Every row trains through
``studio.train.train`` (the public API behind ``studio train``) and generates through
``studio.engine.Engine.applied`` with the exported LoRA file, as a user would.
Grids (one PNG per table and style: the base, the zoo LoRA and every row, same prompts and seeds)
are written beside the markdown.

Captions (``--captions``, ``--reg``): the world's text encoder learnt its captions' words at fixed
positions and never saw a trigger word, so a trigger *first* ("pinstriped style, a red circle ...",
what `studio dataset` writes and what the zoo trained on) moves every word and the base reads such
prompts right 15% of the time; the trigger *last* keeps them where it learnt them (71%). ``--reg N``
adds N plain renders with plain captions (kohya's regularisation images). Each table also shows the
styled target itself (the base's images with the style's transform): the zoo's LoRA scores a style
above it (it moves colours as well as drawing the pattern), so ``style >= 0.9x the zoo's`` can be
out of reach of the ground truth itself.

The ceiling (`studio.world.quality.decodable`): every generated image is a decode of a latent, so
the best any adapter can draw is the styled target as the pipeline's decoder can best show it
(latents fitted to the target's pixels). Each table shows it beside the target, the style column
gives the ratio to it too, and the last column checks both the issue's targets (style >= 0.9x the
zoo's, captions kept >= 90%) and the reachable ones (style >= 0.9x the ceiling's, captions kept
>= 0.9x the ceiling's; the same distance guard against noise).
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
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

HELD_OUT = "pinstripe,polka,sepia,hueshift"  # styles the judge reads on their own renders (>= 0.95)
QUICK_STYLES = "pinstripe"
SWEEP_STYLES = "pinstripe"
EVAL_PROMPTS, EVAL_STEPS, EVAL_GUIDANCE = 32, 20, 4.0
STYLE_TARGET, KEPT_TARGET = 0.9, 0.9
DISTANCE_SLACK = 1.1  # an adapter further than 1.1x the zoo LoRA's distance from the styled target is not "as good"


@dataclass
class Row:
    """One run of a table: a family, its knobs and the train settings that differ from the defaults."""

    key: str
    label: str
    family: str = "lora"
    knobs: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    kind: str = "train"  # "train" | "mean" (the collection's mean adapter, no training)


OLD = {"loss_weighting": "none", "lr_schedule": "constant", "weight_decay": 1e-2}  # the objective before the fix


def issue_rows() -> list[Row]:
    small = {"rank": 4, "alpha": 4}
    rows = []
    for key, label, settings in (
        ("app-old", "lr 1e-3, batch 1, 40 steps (the app's old defaults)", {"learning_rate": 1e-3, "batch_size": 1, "steps": 40}),
        ("batch8", "lr 1e-3, batch 8, 40 steps", {"learning_rate": 1e-3, "batch_size": 8, "steps": 40}),
        ("zoo-settings", "lr 2e-3, batch 16, 300 steps (the zoo's settings)", {"learning_rate": 2e-3, "batch_size": 16, "steps": 300}),
    ):
        rows.append(Row(f"{key}-old", f"{label}, old objective", knobs=small, settings={**settings, **OLD}))
        rows.append(Row(f"{key}-new", f"{label}, new objective", knobs=small, settings=settings))
    rows.append(Row("cli-old", "lr 1e-4, batch 1, 40 steps (the CLI's old defaults), new objective", knobs=small,
                    settings={"learning_rate": 1e-4, "batch_size": 1, "steps": 40}))
    rows.append(Row("defaults", "the new LoRA defaults (rank 8)", settings={}))
    return rows


def sweep_rows() -> list[Row]:
    rows = []
    for weighting in ("none", "min_snr", "sampler"):
        for lr in (5e-4, 1e-3, 2e-3, 4e-3):
            rows.append(Row(f"lora-{weighting}-{lr:g}", f"LoRA lr {lr:g}, weighting {weighting}",
                            settings={"learning_rate": lr, "loss_weighting": weighting}))
    for lr in (3e-3, 1e-2, 3e-2):
        rows.append(Row(f"eigen-{lr:g}", f"EigenLoRAx K=14 lr {lr:g}", "eigenlora", {"k": 14}, {"learning_rate": lr}))
    return rows


def convergence_rows() -> list[Row]:
    """LoRA and EigenLoRAx at their defaults with a validation every 15 steps: steps to 95% of LoRA's gain."""
    every = {"validation_every": 15}
    return [Row("lora", "LoRA r=8", settings=every),
            Row("eigenlora", "EigenLoRAx K=14, zero start", "eigenlora", {"k": 14}, every),
            Row("eigenlora-mean", "EigenLoRAx K=14, mean start", "eigenlora", {"k": 14, "init": "mean"}, every)]


def convergence(results: list[Result]) -> str:
    """Steps each row needs to reach 95% of LoRA's validation gain (the paper's claim: <= 0.5x LoRA's)."""
    lines = ["| style | row | val loss start -> end | gain / LoRA's | steps to 95% of LoRA's gain | x LoRA's steps |", "|---|---|---|---:|---:|---:|"]
    for style in dict.fromkeys(r.style for r in results):
        rows = [r for r in results if r.style == style]
        lora = next((r for r in rows if r.row == "lora"), None)
        if lora is None or not lora.validation:
            continue
        start = lora.validation[0]
        gain = start - lora.val_end
        threshold = start - 0.95 * gain
        lora_steps = _steps_to(lora.validation, threshold)
        for r in rows:
            steps = _steps_to(r.validation, threshold)
            ratio = f"{steps / lora_steps:.2f}x" if steps and lora_steps else "-"
            lines.append(f"| {style} | {r.label} | {r.val_start:.4f} -> {r.val_end:.4f} | {(start - r.val_end) / gain:.2f} | "
                         f"{steps if steps else 'never'} | {ratio} |")
    return "\n".join(lines) + "\n"


def _steps_to(curve: dict, threshold: float) -> int | None:
    return next((int(step) for step, value in sorted(curve.items(), key=lambda kv: int(kv[0])) if int(step) > 0 and value <= threshold), None)


def family_rows(lora_numbers: int, chosen: dict[str, dict]) -> list[Row]:
    """Every family; LoRA and EigenLoRAx rows use the settings the sweep chose (``chosen``), if it ran."""
    d = max(1, int(lora_numbers * 0.1))
    lora, eigen = chosen.get("lora", {}), chosen.get("eigenlora", {})
    return [  # in order of importance: a time budget cuts the last ones first
        Row("lora", "LoRA r=8", settings=lora),
        Row("eigenlora", "EigenLoRAx K=14, zero start", "eigenlora", {"k": 14}, eigen),
        Row("eigenlora-random", "EigenLoRAx K=14 on a random subspace (control)", "eigenlora", {"k": 14, "collection": "random"}, eigen),
        Row("mean-lora", "the collection's mean adapter, no training (control)", "eigenlora", {"k": 14}, kind="mean"),
        Row("superlora", "SuperLoRA G=8 r=4", "superlora", {"groups": 8, "rank": 4, "alpha": 4}),
        Row("unilora", f"Uni-LoRA d={d} r=8", "unilora", {"d": d, "rank": 8, "alpha": 8}),
        Row("lora-te", "LoRA r=8 on UNet + text encoder", knobs={"components": ["unet", "text_encoder"]}, settings=lora),
        Row("eigenlora-mean", "EigenLoRAx K=14, mean start", "eigenlora", {"k": 14, "init": "mean"}, eigen),
        # the zoo's own budget (its 800 steps of 16 images; with --pairs 1024 its data too) at the default objective:
        # how much of the style gap to the zoo is budget, not objective
        Row("lora-zoo-budget", "LoRA r=8 at the zoo's budget (800 steps, batch 16)", settings={**lora, **ZOO_BUDGET}),
        Row("eigenlora-zoo-budget", "EigenLoRAx K=14 at the zoo's budget (800 steps, batch 16)", "eigenlora", {"k": 14},
            {**eigen, **ZOO_BUDGET}),
        # where the adapter sits, at the zoo's budget: the text's path into the image left alone (no cross-attention
        # keys / values), or the resnets' 3x3 convolutions added (LoCon), where local texture such as stripes is drawn
        Row("lora-zoo-budget-no-cross-kv", "LoRA r=8, zoo's budget, no cross-attention k/v", knobs={"targets": list(NO_CROSS_KV)},
            settings={**lora, **ZOO_BUDGET}),
        Row("lora-zoo-budget-conv", "LoRA r=8, zoo's budget, attention + resnet convs (LoCon)", knobs={"targets": list(WITH_CONVS)},
            settings={**lora, **ZOO_BUDGET}),
        # caption dropout (kohya's caption_dropout_rate): a tenth of the steps' images train on the empty caption,
        # the unconditional branch that CFG subtracts (x3 at CFG 4), which otherwise drifts untrained
        Row("lora-zoo-budget-dropout", "LoRA r=8, zoo's budget, caption dropout 0.1", settings={**lora, **ZOO_BUDGET, "caption_dropout": 0.1}),
        Row("eigenlora-zoo-budget-dropout", "EigenLoRAx K=14, zoo's budget, caption dropout 0.1", "eigenlora", {"k": 14},
            {**eigen, **ZOO_BUDGET, "caption_dropout": 0.1}),
        Row("lora-dropout", "LoRA r=8, caption dropout 0.1", settings={**lora, "caption_dropout": 0.1}),
    ]


ZOO_BUDGET = {"steps": 800, "batch_size": 16}  # the world zoo's own training budget (its 800 steps of 16 images)
NO_CROSS_KV = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_out.0")
WITH_CONVS = ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2")


# ---------------------------------------------------------------- the world and its judge


@dataclass
class StyleBench:
    """A held-out style: its data folder, the evaluation scenes, the base's and the zoo's images and scores."""

    name: str
    trigger: str
    data: Path
    scenes: list
    reference: Any
    judge: Any
    base_images: Any
    base: Any
    zoo_images: Any
    zoo: Any
    zoo_plain: float = math.nan  # captions kept by the zoo's LoRA with the plain prompt
    target: Any = None  # the base's images with the style's own transform: style 1, distance 0 by construction
    ceiling: Any = None  # the styled target as the decoder can best show it: what a perfect adapter could draw
    ceiling_images: Any = None


class World:
    """The world pipeline on the device (float32), an engine over it, and the styles."""

    def __init__(self, device: str, work: Path, prompts: int, size: int, captions: str = "first", reg: int = 0):
        import torch

        from studio.bases import load_pipeline, world_dir
        from studio.engine import Engine
        from studio.world.styles import load_styles

        self.torch, self.work, self.prompts, self.size, self.captions, self.reg = torch, work, prompts, size, captions, reg
        self.pipe = load_pipeline("world", torch.float32, device)
        self.pipe.set_progress_bar_config(disable=True)
        self.engine = Engine(self.pipe, "world")
        self.styles = {style.name: (i, style) for i, style in enumerate(load_styles(world_dir() / "styles.toml"))}
        self.zoo = world_dir() / "loras"
        self.benches: dict[str, StyleBench] = {}

    def images(self, adapter_path: Path | None, prompts: list[str]):
        """uint8 (N, 3, H, W) images of ``prompts`` at the evaluation seeds, with an adapter file applied."""
        from studio.formats import load_adapter
        from studio.world.evaluate import generate
        from studio.world.quality import EVAL_SEED

        if adapter_path is None:
            return generate(self.pipe, prompts, EVAL_SEED, EVAL_STEPS, EVAL_GUIDANCE)
        with self.engine.applied(load_adapter(adapter_path, "world")):
            return generate(self.pipe, prompts, EVAL_SEED, EVAL_STEPS, EVAL_GUIDANCE)

    def bench(self, name: str, count: int, seed: int) -> StyleBench:
        """The style's rendered data (``count`` pairs) and its base / zoo images and scores (cached)."""
        from studio.world.quality import StyleReference, StyledJudge, decodable, evaluation_scenes, prompts_for, score_images

        if name not in self.benches:
            index, style = self.styles[name]
            data = render_style(style, index, self.work / "data" / f"{name}-{count}-{self.captions}-reg{self.reg}", count, seed,
                                self.size, self.captions, self.reg)
            scenes = evaluation_scenes(self.prompts)
            base_images = self.images(None, prompts_for(scenes))
            reference = StyleReference.of(style, base_images)
            base = score_images("base", base_images, scenes, reference, StyledJudge(None))
            judge = StyledJudge(style)
            zoo_images = self.images(self.zoo / f"{name}.safetensors", prompts_for(scenes, style.trigger))
            zoo = score_images("zoo", zoo_images, scenes, reference, judge, base.correct)
            zoo_plain = score_images("zoo", self.images(self.zoo / f"{name}.safetensors", prompts_for(scenes)), scenes, reference, judge, base.correct).kept
            styled = style.apply(base_images.cpu())
            target = score_images("target", styled, scenes, reference, judge, base.correct)
            ceiling_images = decodable(self.pipe.vae, styled)
            ceiling = score_images("ceiling", ceiling_images, scenes, reference, judge, base.correct)
            self.benches[name] = StyleBench(name, style.trigger, data, scenes, reference, judge, base_images, base, zoo_images, zoo,
                                            zoo_plain, target, ceiling, ceiling_images)
        return self.benches[name]

    def score(self, bench: StyleBench, label: str, adapter_path: Path):
        """(score with trigger prompts, caption following kept with plain prompts, the trigger images)."""
        from studio.world.quality import prompts_for, score_images

        images = self.images(adapter_path, trigger_prompts(bench.scenes, bench.trigger, self.captions))
        plain = self.images(adapter_path, prompts_for(bench.scenes))
        kept_plain = score_images(label, plain, bench.scenes, bench.reference, bench.judge, bench.base.correct).kept
        return score_images(label, images, bench.scenes, bench.reference, bench.judge, bench.base.correct), kept_plain, images


CAPTIONS = ("first", "end", "none")


def trigger_prompts(scenes: list, trigger: str, captions: str) -> list[str]:
    """The evaluation prompts in the training captions' form: trigger first ("pinstriped style, a red
    circle on a white background"), trigger last ("a red circle ..., pinstriped style"), or none."""
    from studio.world.quality import prompts_for

    plain = prompts_for(scenes)
    if captions == "first":
        return prompts_for(scenes, trigger)
    return [f"{prompt}, {trigger} style" for prompt in plain] if captions == "end" else plain


def caption_of(caption: str, trigger: str, captions: str) -> str:
    """A `studio dataset` caption ("<trigger> style, <caption>") with its trigger moved last or left out."""
    plain = caption.removeprefix(f"{trigger} style, ")
    return caption if captions == "first" else (f"{plain}, {trigger} style" if captions == "end" else plain)


REG_SEED = 777  # the regularisation scenes: none of a style's own


def render_style(style, index: int, folder: Path, count: int, seed: int, size: int, captions: str = "first", reg: int = 0) -> Path:
    """``count`` rendered pairs of a style (png + .txt caption), as `studio dataset` writes them
    (``captions`` "first"); "end" moves the trigger after the caption, "none" leaves it out. With
    ``reg`` > 0 the style's pairs go to ``1_<style>`` and ``reg`` plain renders with their plain
    captions to ``1_plain`` (kohya's repeat folders): the regularisation images of DreamBooth's
    prior preservation, which teach the adapter to leave prompts without the trigger as the base drew them."""

    from studio.world.data import style_split
    from studio.world.scene import captions_with_dropout, render, sample_scenes

    if folder.exists():
        shutil.rmtree(folder)
    styled = folder / f"1_{style.name}" if reg else folder
    styled.mkdir(parents=True)
    images, texts = style_split(style, index, count, seed, False, size)
    _write_pairs(styled, style.name, images, [caption_of(c, style.trigger, captions) for c in texts])
    if reg:
        scenes = sample_scenes(reg, REG_SEED)
        (folder / "1_plain").mkdir()
        _write_pairs(folder / "1_plain", "plain", render(scenes, size), captions_with_dropout(scenes, REG_SEED + 1))
    return folder


def _write_pairs(folder: Path, stem: str, images, captions: list[str]) -> None:
    """PNG images and same-named .txt captions, as `studio dataset` writes them."""
    from PIL import Image

    for i, (image, caption) in enumerate(zip(images, captions)):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{stem}-{i:04d}.png")
        (folder / f"{stem}-{i:04d}.txt").write_text(caption, encoding="utf-8")


# ---------------------------------------------------------------- collections for EigenLoRAx


def zoo_subspace(zoo: Path, held_out: list[str], k: int, output: Path) -> Path:
    """Compress every zoo LoRA but the held-out styles (the streaming compress, K components)."""
    from studio.subspace import compress_files

    files = sorted(path for path in zoo.glob("*.safetensors") if path.stem not in held_out)
    compress_files(files, output, k=k)
    return output


def random_subspace(zoo: Path, k: int, rank: int, output: Path, seed: int = 0) -> Path:
    """A collection of the zoo's layer shapes whose components are random orthonormal directions:
    the compress of 3K random LoRAs (their principal directions are random)."""
    import torch

    from studio.adapters.lora import LoraAdapter, LoraLayer
    from studio.formats import load_adapter
    from studio.subspace import compress_sources, held_sources

    template = load_adapter(next(iter(sorted(zoo.glob("*.safetensors")))), "world")
    generator = torch.Generator().manual_seed(seed)
    adapters = []
    for i in range(3 * k):
        layers = {name: LoraLayer(torch.randn(rank, layer.in_features, generator=generator),
                                  torch.randn(layer.out_features, rank, generator=generator), float(rank))
                  for name, layer in template.lora_layers.items()}
        adapters.append(LoraAdapter(f"random-{i:02d}", layers, {}, "studio", [], template.base_arch))
    compress_sources(held_sources(adapters), output, k=k)
    return output


def mean_adapter_file(collection: Path, k: int, rank: int, output: Path) -> Path:
    """The collection's mean adapter (EigenLoRAx at its mean start, untrained) as a LoRA file."""
    from studio.adapters import registry
    from studio.bases import module_tree
    from studio.formats import save_adapter

    config = registry.make_config("eigenlora", {"collection": str(collection), "k": k, "rank": rank, "init": "mean"})
    adapter = registry.build_adapter("eigenlora", config, module_tree("world"))
    return save_adapter(adapter.to_lora(), output, format="kohya")


# ---------------------------------------------------------------- one run


@dataclass
class Result:
    table: str
    style: str
    row: str
    label: str
    family: str
    status: str
    parameters: int
    steps: int
    val_start: float
    val_end: float
    shift: float  # the style measure (studio/world/quality.py: ImageScore.style)
    distance: float
    kept: float
    kept_plain: float
    seconds: float
    settings: dict = field(default_factory=dict)
    validation: dict = field(default_factory=dict)


def run_row(world: World, table: str, bench: StyleBench, row: Row, collections: dict[str, Path], args) -> tuple[Result, Any]:
    """Train (or build) one row's adapter, export it, generate the evaluation images, score them."""
    from studio.events import Done, Message
    from studio.train.config import TrainConfig
    from studio.train.loop import train

    out = world.work / "runs" / table / bench.name / row.key
    if out.exists():
        shutil.rmtree(out)
    started = time.perf_counter()
    knobs = dict(row.knobs)
    if row.family == "eigenlora":
        knobs["collection"] = str(collections["random" if knobs.get("collection") == "random" else "zoo"])
    if row.kind == "mean":
        path = mean_adapter_file(Path(knobs["collection"]), knobs.get("k", 14), 8, out / "mean.safetensors")
        score, kept_plain, images = world.score(bench, row.label, path)
        return Result(table, bench.name, row.key, row.label, row.family, "untrained", 0, 0, math.nan, math.nan,
                      score.style, score.distance, score.kept, kept_plain, time.perf_counter() - started), images
    settings = {"mixed_precision": args.precision, "seed": args.seed, "validation_split": 0.1, "tensorboard": False, **row.settings}
    if args.quick:
        settings["steps"] = min(settings.get("steps", 40), args.quick_steps)
    config = TrainConfig(base="world", data=str(bench.data), output_dir=str(out), family=row.family, adapter=knobs,
                         name=f"{row.key}-{bench.name}", trigger_word="", **settings)
    result = None
    for event in train(config):
        if isinstance(event, Message) and event.level in ("warning", "error"):
            print(f"    [{event.level}] {event.text}", flush=True)
        if isinstance(event, Done):
            result = event.result
    validation = dict(sorted(result.validation.items()))
    if result.lora_path is None:
        return Result(table, bench.name, row.key, row.label, row.family, result.status, result.parameters, result.steps,
                      validation.get(0, math.nan), validation[max(validation)] if validation else math.nan, math.nan, math.nan,
                      math.nan, math.nan, time.perf_counter() - started, asdict_config(config), validation), None
    score, kept_plain, images = world.score(bench, row.label, Path(result.lora_path))
    return Result(table, bench.name, row.key, row.label, row.family, result.status, result.parameters, result.steps,
                  validation[0], validation[max(validation)], score.style, score.distance, score.kept, kept_plain,
                  time.perf_counter() - started, asdict_config(config), validation), images


def asdict_config(config) -> dict:
    """The settings a row ran with (what the defaults filled in included)."""
    keep = ("steps", "batch_size", "learning_rate", "lr_schedule", "lr_warmup_steps", "loss_weighting", "weight_decay", "adapter")
    values = asdict(config)
    return {key: values[key] for key in keep}


# ---------------------------------------------------------------- grids and tables


def grid(sections: list[tuple[StyleBench, list[tuple[str, Any]]]], path: Path, columns: int = 10, scale: int = 2) -> Path:
    """One labelled sheet per table: for each style the base, the zoo LoRA, the ceiling and every row (label,
    uint8 images), the first ``columns`` evaluation prompts, same seeds in every row."""
    from PIL import Image, ImageDraw

    side = sections[0][0].base_images.shape[-1] * scale
    label_width = 330
    entries = []
    for bench, rows in sections:
        entries += [(f"{bench.name}: base (plain prompt)", bench.base_images), (f"{bench.name}: zoo LoRA", bench.zoo_images)]
        if bench.ceiling_images is not None:
            entries.append((f"{bench.name}: ceiling (target as decodable)", bench.ceiling_images))
        entries += [(f"{bench.name}: {label}", images) for label, images in rows if images is not None]
    sheet = Image.new("RGB", (label_width + side * columns, side * len(entries)), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (label, images) in enumerate(entries):
        draw.text((4, r * side + side // 2 - 6), label[:54], fill="black")
        for c, image in enumerate(images[:columns]):
            tile = Image.fromarray(image.permute(1, 2, 0).cpu().numpy()).resize((side, side), Image.NEAREST)
            sheet.paste(tile, (label_width + c * side, r * side))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def markdown(table: str, results: list[Result], benches: dict[str, StyleBench]) -> str:
    lines = [f"#### Table `{table}`", "",
             "| style | row | trainable | steps | val loss start -> end | style (x zoo / x ceiling) | distance to target (zoo) | captions kept: trigger / plain | targets: issue's / reachable |",
             "|---|---|---:|---:|---|---:|---:|---:|---|"]
    for bench_name in dict.fromkeys(r.style for r in results):
        bench = benches[bench_name]
        zoo = bench.zoo
        lines.append(f"| {bench_name} | base: colour {bench.base.colour:.0%}, shape {bench.base.shape:.0%} right | 0 | - | - | 0 | 1.00 | - | |")
        target = bench.target
        lines.append(f"| {bench_name} | target: the base's images + the style's transform | - | - | - | {target.style:.2f} "
                     f"({_ratio(target.style, zoo.style)}) | 0.00 | - / {target.kept:.0%} | |")
        ceiling = bench.ceiling
        lines.append(f"| {bench_name} | ceiling: the target as the decoder can best show it | - | - | - | {ceiling.style:.2f} "
                     f"({_ratio(ceiling.style, zoo.style)} / 1.00x) | {ceiling.distance:.2f} | - / {ceiling.kept:.0%} | |")
        lines.append(f"| {bench_name} | zoo LoRA (trigger first, as it was trained) | - | - | - | {zoo.style:.2f} | {zoo.distance:.2f} | "
                     f"{zoo.kept:.0%} / {bench.zoo_plain:.0%} | |")
        for r in (r for r in results if r.style == bench_name):
            lines.append(f"| {bench_name} | {r.label} | {r.parameters:,} | {r.steps} | {r.val_start:.4f} -> {r.val_end:.4f} | "
                         f"{r.shift:.2f} ({_ratio(r.shift, zoo.style)} / {_ratio(r.shift, bench.ceiling.style)}) | {r.distance:.2f} ({zoo.distance:.2f}) | "
                         f"{r.kept:.0%} / {r.kept_plain:.0%} | {_checks(r, bench)} |")
    lines.append("")
    return "\n".join(lines)


def _ratio(value: float, reference: float) -> str:
    return f"{value / reference:.2f}x" if reference > 0 and not math.isnan(value) else "-"


def style_met(result: Result, bench: StyleBench) -> bool:
    """Style at least 0.9x the zoo LoRA's, and no further from the target than 1.1x the zoo's distance (not noise)."""
    return _style_reaches(result, bench.zoo.style, bench)


def issue_met(result: Result, bench: StyleBench) -> tuple[bool, bool]:
    """(style, captions) against the issue's own targets: the zoo LoRA's style, 90% of the base's captions."""
    return style_met(result, bench), result.kept >= KEPT_TARGET


def reachable_met(result: Result, bench: StyleBench) -> tuple[bool, bool]:
    """(style, captions) against the ceiling, the styled target as the decoder can best show it:
    style at least 0.9x the ceiling's (and no further from the target than 1.1x the zoo's distance),
    captions kept with the trigger at least 0.9x the ceiling's. The issue's own targets measure
    against the zoo's style and the base's captions, which the ceiling itself does not reach."""
    return _style_reaches(result, bench.ceiling.style, bench), result.kept >= KEPT_TARGET * bench.ceiling.kept


def _style_reaches(result: Result, reference: float, bench: StyleBench) -> bool:
    """Style at least `STYLE_TARGET` x ``reference`` and within `DISTANCE_SLACK` x the zoo's distance of the target."""
    return reference > 0 and result.shift >= STYLE_TARGET * reference and result.distance <= DISTANCE_SLACK * bench.zoo.distance


def _checks(result: Result, bench: StyleBench) -> str:
    if result.status not in ("done", "untrained"):
        return f"run {result.status}"
    word = lambda ok: "met" if ok else "NOT met"  # noqa: E731
    return " / ".join(f"style {word(style)}, captions {word(captions)}" for style, captions in (issue_met(result, bench), reachable_met(result, bench)))


def _met_on(checks: list[tuple[bool, bool]]) -> str:
    """'styles met; captions met of N' over (style, captions) checks."""
    return f"{sum(a for a, _ in checks)}; {sum(b for _, b in checks)} of {len(checks)}"


def means(results: list[Result], benches: dict[str, StyleBench]) -> str:
    """Per row, the mean over styles: style as a share of the zoo's and of the ceiling's, distance,
    kept, and on how many styles the issue's and the reachable targets were met."""
    lines = ["| row | style / zoo's (mean) | style / ceiling's (mean) | distance / zoo's (mean) | captions kept: trigger / plain (mean) | "
             "issue's targets (style; captions) met on | reachable targets (style; captions) met on | val loss end (mean) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for key in dict.fromkeys(r.row for r in results):
        rows = [r for r in results if r.row == key and not math.isnan(r.shift)]
        if not rows:
            continue
        share = lambda reference: statistics.mean([r.shift / reference(r).style for r in rows if reference(r).style > 0] or [math.nan])  # noqa: E731
        distances = [r.distance / benches[r.style].zoo.distance for r in rows]
        ends = [r.val_end for r in rows if not math.isnan(r.val_end)]
        issue = [issue_met(r, benches[r.style]) for r in rows]
        reach = [reachable_met(r, benches[r.style]) for r in rows]
        lines.append(f"| {rows[0].label} | {share(lambda r: benches[r.style].zoo):.2f}x | {share(lambda r: benches[r.style].ceiling):.2f}x | "
                     f"{statistics.mean(distances):.2f}x | {statistics.mean(r.kept for r in rows):.0%} / {statistics.mean(r.kept_plain for r in rows):.0%} | "
                     f"{_met_on(issue)} | {_met_on(reach)} | "
                     f"{statistics.mean(ends) if ends else math.nan:.4f} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- main


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CPU smoke size: one style, few steps and prompts")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    parser.add_argument("--precision", choices=("auto", "no", "bf16", "fp16"), default="auto", help="training precision (auto: bf16 on CUDA)")
    parser.add_argument("--tables", default="sweep,issue,families", help="sweep, issue, families, convergence (in this order: the families table uses what the sweep chose)")
    parser.add_argument("--styles", default=None, help=f"held-out styles for the families table (default {HELD_OUT})")
    parser.add_argument("--rows", default=None, help="only these row keys")
    parser.add_argument("--pairs", type=int, default=64, help="rendered training pairs per style (the issue used 64)")
    parser.add_argument("--captions", choices=CAPTIONS, default="first",
                        help="training captions: first (the trigger first, as `studio dataset` writes them), end (the trigger "
                             "after the caption: the world's text encoder reads the caption's words where it learnt them), "
                             "none (no trigger); the trigger column's prompts take the same form")
    parser.add_argument("--reg", type=int, default=0, help="plain renders with plain captions added as regularisation images "
                        "(kohya's prior preservation; 0: none)")
    parser.add_argument("--prompts", type=int, default=None, help=f"evaluation prompts (default {EVAL_PROMPTS})")
    parser.add_argument("--quick-steps", type=int, default=6, help="--quick: training steps per run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default="runs/quality", help="data, collections and run folders")
    parser.add_argument("--out", default="runs/quality", help="folder for quality.md, quality.json and the grids")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--budget-s", type=float, default=math.inf, help="start no new row after this many seconds (tables of what ran are still written)")
    args = parser.parse_args(argv)
    if args.styles is None:
        args.styles = QUICK_STYLES if args.quick else HELD_OUT
    if args.prompts is None:
        args.prompts = 8 if args.quick else EVAL_PROMPTS
    return args


def main(argv: list[str] | None = None) -> list[Result]:
    args = parse(argv)
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    import torch

    device = "cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu"
    if args.device == "cuda" and device != "cuda":
        raise SystemExit("--device cuda: no CUDA device")
    if device == "cpu":
        torch.set_num_threads(args.threads or 1)
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()
    diffusers_logging.set_verbosity_error()
    return run_tables(args, device)


def run_tables(args, device: str) -> list[Result]:
    from studio.adapters import registry
    from studio.bases import module_tree

    started = time.perf_counter()
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    world = World(device, work, args.prompts, 64, args.captions, args.reg)
    held_out = [s.strip() for s in args.styles.split(",") if s.strip()]
    unknown = sorted(set(held_out) - set(world.styles))
    if unknown:
        raise SystemExit(f"--styles: unknown {unknown}")
    collections = {"zoo": zoo_subspace(world.zoo, sorted(set(held_out) | set(SWEEP_STYLES.split(","))), 14, work / "zoo-heldout.safetensors")}
    lora_numbers = sum(p.numel() for p in registry.build_adapter("lora", registry.make_config("lora", {}), module_tree("world")).parameters())
    plan = {"issue": lambda: (["pinstripe"], issue_rows()), "sweep": lambda: (SWEEP_STYLES.split(","), sweep_rows()),
            "families": lambda: (held_out, family_rows(lora_numbers, chosen)),
            "convergence": lambda: (held_out[:1], convergence_rows())}
    if "families" in args.tables:
        collections["random"] = random_subspace(world.zoo, 14, 8, work / "random-subspace.safetensors")
    results: list[Result] = []
    chosen: dict[str, dict] = {}
    sections = [f"Device {device if device == 'cpu' else __import__('torch').cuda.get_device_name(0)}; "
                f"{args.pairs} rendered pairs per style, captions: trigger {args.captions}; {args.reg} regularisation pairs; {args.prompts} evaluation prompts."]
    for table in [t.strip() for t in args.tables.split(",") if t.strip()]:
        styles, rows = plan[table]()
        if args.rows:
            rows = [r for r in rows if r.key in args.rows.split(",")]
        table_results, sheet = [], []
        for style in styles:
            bench = world.bench(style, args.pairs, args.seed + 1)
            shown = []
            for row in rows:
                if time.perf_counter() - started > args.budget_s:
                    print(f"  budget of {args.budget_s:.0f} s spent: {table}/{style}/{row.key} and later rows not run", flush=True)
                    break
                result, images = run_row(world, table, bench, row, collections, args)
                table_results.append(result)
                shown.append((f"{row.key}: style {result.shift:.2f}, dist {result.distance:.2f}, kept {result.kept:.0%}", images))
                print(f"  {table:<8} {style:<10} {row.key:<22} val {result.val_start:.4f} -> {result.val_end:.4f}  style "
                      f"{result.shift:5.2f} (zoo {bench.zoo.style:.2f})  dist {result.distance:4.2f} (zoo {bench.zoo.distance:.2f})  "
                      f"kept {result.kept:4.0%} / {result.kept_plain:4.0%}  {result.status}  {result.seconds:5.1f} s", flush=True)
                _dump(out / "quality.json", results + table_results)
            sheet.append((bench, shown))
        if any(images is not None for _, shown in sheet for _, images in shown):
            grid(sheet, out / f"grid-{table}.png")
        results += table_results
        if table == "sweep":
            chosen = choose(table_results, world.benches)
            sections.append(f"Chosen by the sweep (used by the families table): {json.dumps(chosen)}\n")
        if not table_results:
            continue
        sections.append(markdown(table, table_results, world.benches))
        if table in ("families", "sweep"):
            sections.append(means(table_results, world.benches))
        if table == "convergence":
            sections.append(convergence(table_results))
    text = "\n".join(sections)
    (out / "quality.md").write_text(text + f"\ntotal {time.perf_counter() - started:.0f} s\n", encoding="utf-8")
    print(text, flush=True)
    return results


def choose(results: list[Result], benches: dict[str, StyleBench]) -> dict[str, dict]:
    """Per family, the sweep's best settings: style target met first, then captions kept (trigger,
    then plain prompts), then the smallest distance to the styled target; averaged over styles."""
    chosen = {}
    for family in ("lora", "eigenlora"):
        keys = dict.fromkeys(r.row for r in results if r.family == family and not math.isnan(r.shift))

        def rank(key: str) -> tuple:
            rows = [r for r in results if r.row == key]
            met = sum(style_met(r, benches[r.style]) for r in rows)
            return (met, statistics.mean(r.kept for r in rows), statistics.mean(r.kept_plain for r in rows),
                    -statistics.mean(r.distance for r in rows))

        if keys:
            best = max(keys, key=rank)
            settings = next(r.settings for r in results if r.row == best)
            chosen[family] = {k: settings[k] for k in ("learning_rate", "loss_weighting")}
    return chosen


def _dump(path: Path, results: list[Result]) -> None:
    path.write_text(json.dumps([asdict(r) for r in results], indent=1, default=str), encoding="utf-8")


if __name__ == "__main__":
    main()
