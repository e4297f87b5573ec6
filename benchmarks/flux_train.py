"""FLUX.1-dev LoRA training speed and memory through `studio.train`, against a peft LoRA anchor.

The real FLUX.1-dev transformer architecture (~12 B parameters, random bf16 weights built on the
GPU; ``benchmarks/flux_models.py``; small stand-in text encoders with the real output widths,
said in the output) trains a rank-r LoRA (default targets: to_q / to_k / to_v / to_out.0)
through ``studio.train.train(config)``, the real loop: a dataset of random images written to a
folder, VAE-encoded and text-encoded once, flow-matching steps on packed latents with the
guidance embedding, bf16 mixed precision, AdamW, validation at the first and last step. The
pipeline is built in memory and handed to the loop in place of ``load_pipeline`` (nothing else
is replaced). Rows: batch 1 and 4 at 1024 px, with and without gradient checkpointing
(``gradient_checkpointing = true``; a configuration that does not fit says "out of memory").

Anchor, measured in the same run on the same transformer: a minimal peft LoRA loop (diffusers
``add_adapter(LoraConfig)``, the same rank and targets, the same denoiser call, AdamW) at the
same batch and checkpointing. Step time is the median interval between the loop's Progress
events after ``--warmup`` steps (the last step, which also validates, left out).

    GPU:  python benchmarks/flux_train.py --device cuda
    CPU smoke test (shrunken transformer, 64 px): python benchmarks/flux_train.py --quick
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from studio.events import Done, Message, Progress  # noqa: E402
from studio.train import session as session_mod  # noqa: E402
from studio.train import train  # noqa: E402
from studio.train.config import TrainConfig  # noqa: E402

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


@dataclass
class TrainRow:
    what: str
    batch: int
    checkpointing: bool
    step_s: float | None
    peak_gib: float | None
    trainable: int = 0
    note: str = ""
    optimizer_mib: float | None = None


def random_dataset(folder: Path, count: int, size: int, seed: int = 0) -> Path:
    """``count`` random smooth colour images of ``size`` px with captions (a data folder the loop reads)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for index in range(count):
        coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC).save(folder / f"img{index:02d}.png")
        (folder / f"img{index:02d}.txt").write_text(["a red circle", "a blue square", "a green triangle"][index % 3])
    return folder


@contextlib.contextmanager
def handed_pipeline(pipe: Any) -> Iterator[list]:
    """The loop gets ``pipe`` (already on the device) for any base; each run's sessions are collected so
    their adapter hooks can be detached afterwards (the loop leaves them on the pipeline it loaded)."""
    sessions: list = []
    load, start = session_mod.load_pipeline, session_mod.start

    def started(config, scan):
        run = start(config, scan)
        sessions.append(run)
        return run

    session_mod.load_pipeline = lambda base, dtype=None, device="cpu": pipe
    session_mod.start = started
    try:
        yield sessions
    finally:
        session_mod.load_pipeline, session_mod.start = load, start


def _release(pipe: Any, denoiser: str, sessions: list) -> None:
    for run in sessions:
        run.attached.detach()
    sessions.clear()
    getattr(pipe, denoiser).disable_gradient_checkpointing()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


@dataclass
class Run:
    """One studio run: batch, gradient checkpointing, the family and its knobs (rank/alpha from --rank when empty)."""
    batch: int
    checkpointing: bool = False
    family: str = "lora"
    knobs: dict | None = None
    label: str = ""


def optimizer_state_mib(optimizer) -> float:
    """MiB of an optimizer's state tensors (AdamW: two moments per trainable number)."""
    return sum(t.numel() * t.element_size() for entry in optimizer.state.values() for t in entry.values() if torch.is_tensor(t)) / 2**20


def _optimizer_mib(sessions: list) -> float | None:
    return optimizer_state_mib(sessions[-1].optimizer) if sessions else None


def bench_config(base: str, data: Path, out: Path, spec: Run, steps: int, size: int, device: torch.device) -> TrainConfig:
    """The loop's config every training benchmark runs: ``steps`` at lr 1e-4 (constant), bf16 on CUDA,
    validation at the first and last step, nothing exported."""
    knobs = spec.knobs if spec.knobs is not None else {}
    return TrainConfig(base=base, data=str(data), output_dir=str(out), family=spec.family, adapter=knobs, steps=steps,
                       batch_size=spec.batch, learning_rate=1e-4, validation_split=0.15, validation_every=steps,
                       mixed_precision="bf16" if device.type == "cuda" else "no", gradient_checkpointing=spec.checkpointing,
                       resolution=size, export_format="none", tensorboard=False, lr_schedule="constant")


def studio_row(pipe: Any, base: str, data: Path, out: Path, args, spec: Run) -> TrainRow:
    """One `studio.train` run on the handed pipeline: median step time after warm-up, peak memory."""
    denoiser = session_mod.base_of(pipe).denoiser
    device = getattr(pipe, denoiser).device
    if spec.knobs is None:
        spec = dataclasses.replace(spec, knobs={"rank": args.rank, "alpha": args.rank})
    what = f"studio.train(config) [{spec.label or spec.family}]"
    config = bench_config(base, data, out, spec, args.steps, args.size, device)
    stamps: list[float] = []
    trainable, status, optimizer = 0, "?", None
    _reset_peak(device)
    with handed_pipeline(pipe) as sessions:
        try:
            for event in train(config):
                if isinstance(event, Progress):
                    stamps.append(time.perf_counter())
                    optimizer = _optimizer_mib(sessions) if optimizer is None else optimizer
                elif isinstance(event, Done):
                    trainable, status = event.result.parameters, event.result.status
                elif isinstance(event, Message):
                    print(f"#   [{what}, batch {spec.batch}] {event.text}", file=sys.stderr, flush=True)
        except torch.cuda.OutOfMemoryError:
            _release(pipe, denoiser, sessions)
            return TrainRow(what, spec.batch, spec.checkpointing, None, None, note="out of memory")
        finally:
            peak = _peak_gib(device)
            _release(pipe, denoiser, sessions)
    if len(stamps) < 2:
        return TrainRow(what, spec.batch, spec.checkpointing, None, peak, trainable, note=f"run {status} after {len(stamps)} steps")
    intervals = np.diff(stamps)[args.warmup - 1:-1] if len(stamps) > args.warmup + 1 else np.diff(stamps)
    return TrainRow(what, spec.batch, spec.checkpointing, float(np.median(intervals)), peak, trainable, optimizer_mib=optimizer)


def peft_row(pipe: Any, args, batch: int, checkpointing: bool, device: torch.device, text_tokens: int) -> TrainRow:
    """The anchor: a minimal peft LoRA loop on the same denoiser (adapter added once, reused per row)."""
    from peft import LoraConfig

    from studio.bases.conditioning import PromptEmbeds, predict

    base = session_mod.base_of(pipe)
    denoiser = getattr(pipe, base.denoiser)
    if not getattr(denoiser, "peft_config", None):
        denoiser.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian", target_modules=LORA_TARGETS))
        for p in denoiser.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    params = [p for p in denoiser.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    latent_side = args.size // pipe.vae_scale_factor
    channels = pipe.vae.config.latent_channels
    width = getattr(denoiser.config, "joint_attention_dim", None) or denoiser.config.cross_attention_dim
    second = getattr(pipe, "text_encoder_2", None)
    pooled_width = getattr(denoiser.config, "pooled_projection_dim", None) or (second.config.projection_dim if second is not None else None)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if checkpointing:
        denoiser.enable_gradient_checkpointing()
    times = []
    _reset_peak(device)
    try:
        for step in range(args.steps):
            started = time.perf_counter()
            latents = torch.randn(batch, channels, latent_side, latent_side, device=device, dtype=dtype)
            embeds = PromptEmbeds(torch.randn(batch, text_tokens, width, device=device, dtype=dtype),
                                  torch.randn(batch, pooled_width, device=device, dtype=dtype) if pooled_width else None,
                                  torch.zeros(text_tokens, 3, device=device, dtype=dtype) if base.packed_latents else None)
            timesteps = torch.rand(batch, device=device) * 1000 if base.target == "flow" else torch.randint(0, 1000, (batch,), device=device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                prediction = predict(pipe, latents, timesteps, embeds, 3.5)
            loss = torch.nn.functional.mse_loss(prediction.float(), latents.float())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if step >= args.warmup:
                times.append(time.perf_counter() - started)
    except torch.cuda.OutOfMemoryError:
        optimizer.zero_grad(set_to_none=True)
        return TrainRow("peft LoRA minimal loop (anchor)", batch, checkpointing, None, None, note="out of memory")
    finally:
        peak = _peak_gib(device)
        optimizer_mib = optimizer_state_mib(optimizer)
        denoiser.disable_gradient_checkpointing()
        del optimizer
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return TrainRow("peft LoRA minimal loop (anchor)", batch, checkpointing, statistics.median(times), peak, sum(p.numel() for p in params),
                    optimizer_mib=optimizer_mib)


def table(rows: list[TrainRow], anchors: dict[tuple[int, bool], TrainRow]) -> str:
    lines = ["| what (public API call timed) | batch | grad. ckpt | s/step | steps/s | x anchor | peak GiB | trainable | optimizer MiB | note |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---|"]
    for row in rows:
        anchor = anchors.get((row.batch, row.checkpointing))
        ratio = f"{row.step_s / anchor.step_s:.3f}" if row.step_s and anchor and anchor.step_s else "-"
        step = f"{row.step_s:.3f}" if row.step_s else "-"
        speed = f"{1 / row.step_s:.3f}" if row.step_s else "-"
        peak = f"{row.peak_gib:.1f}" if row.peak_gib is not None else "-"
        optimizer = f"{row.optimizer_mib:.3f}" if row.optimizer_mib is not None else "-"
        lines.append(f"| {row.what} | {row.batch} | {'yes' if row.checkpointing else 'no'} | {step} | {speed} | {ratio} | {peak} | "
                     f"{row.trainable:,} | {optimizer} | {row.note} |")
    return "\n".join(lines)


def parse_configs(text: str) -> list[tuple[int, bool]]:
    """``1,1c,4c,4``: batch sizes, ``c`` = with gradient checkpointing."""
    out = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        out.append((int(item.rstrip("c")), item.endswith("c")))
    return out


def common_args(parser: argparse.ArgumentParser, configs: str) -> None:
    parser.add_argument("--quick", action="store_true", help="CPU smoke test: shrunken model, 64 px, 3 steps")
    parser.add_argument("--device", default=None)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of the median")
    parser.add_argument("--images", type=int, default=8, help="images in the random dataset")
    parser.add_argument("--configs", default=configs, help="runs: batch sizes, 'c' = gradient checkpointing (e.g. 1,1c,4c,4)")
    parser.add_argument("--skip-anchor", action="store_true")
    parser.add_argument("--no-cudnn-sdp", action="store_true", help="leave torch's cuDNN attention backend out (torch.backends.cuda.enable_cudnn_sdp(False))")
    parser.add_argument("--probe", action="store_true", help="first: one forward, the largest |activation| after each block")


def quick_args(args: argparse.Namespace) -> argparse.Namespace:
    if args.no_cudnn_sdp:
        torch.backends.cuda.enable_cudnn_sdp(False)
    if args.quick:
        torch.set_num_threads(1)
        args.device = args.device or "cpu"
        args.size, args.rank, args.steps, args.warmup, args.images = 64, 4, 3, 1, 4
    return args


def probe(pipe: Any, args, device: torch.device, text_tokens: int) -> None:
    """One bf16 forward on random inputs: the largest |output| of every block and of the prediction (to stderr)."""
    from studio.bases.conditioning import PromptEmbeds, predict

    base = session_mod.base_of(pipe)
    denoiser = getattr(pipe, base.denoiser)
    seen: list[str] = []

    def hook(name):
        def record(module, inputs, output):
            tensors = output if isinstance(output, tuple) else (output,)
            seen.append(f"{name}:{max(float(t.abs().max()) for t in tensors if torch.is_tensor(t)):.3g}")
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in denoiser.named_modules() if n.count(".") == 1 and n.split(".")[1].isdigit()]
    latent_side = args.size // pipe.vae_scale_factor
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    width = getattr(denoiser.config, "joint_attention_dim", None) or denoiser.config.cross_attention_dim
    pooled = getattr(denoiser.config, "pooled_projection_dim", None) or pipe.text_encoder_2.config.projection_dim
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        latents = torch.randn(1, pipe.vae.config.latent_channels, latent_side, latent_side, device=device, dtype=dtype)
        embeds = PromptEmbeds(torch.randn(1, text_tokens, width, device=device, dtype=dtype), torch.randn(1, pooled, device=device, dtype=dtype),
                              torch.zeros(text_tokens, 3, device=device, dtype=dtype) if base.packed_latents else None)
        timesteps = torch.full((1,), 500.0, device=device)
        prediction = predict(pipe, latents, timesteps, embeds, 3.5)
    for handle in handles:
        handle.remove()
    print(f"# probe: prediction finite={bool(torch.isfinite(prediction).all())} std={float(prediction.float().std()):.3g}; "
          f"block max |out|: {' '.join(seen)}", file=sys.stderr, flush=True)


def run_all(pipe: Any, base: str, args, device: torch.device, text_tokens: int, extra: list[Run] = ()) -> str:
    """Every configured studio run (--configs as LoRA runs, then ``extra``), then the peft anchors; the table.
    The anchor of a row is the peft run at its batch and checkpointing."""
    rows, anchors = [], {}
    if args.probe:
        probe(pipe, args, device, text_tokens)
    with tempfile.TemporaryDirectory() as folder:
        data = random_dataset(Path(folder) / "data", args.images, args.size)
        runs = [Run(batch, checkpointing, label="lora") for batch, checkpointing in parse_configs(args.configs)] + list(extra)
        for index, spec in enumerate(runs):
            rows.append(studio_row(pipe, base, data, Path(folder) / f"run{index}", args, spec))
            print(f"# {rows[-1]}", file=sys.stderr, flush=True)
        if not args.skip_anchor:  # last: peft rewraps the modules it targets
            for batch, checkpointing in sorted({(spec.batch, spec.checkpointing) for spec in runs}):
                anchors[(batch, checkpointing)] = peft_row(pipe, args, batch, checkpointing, device, text_tokens)
                rows.append(anchors[(batch, checkpointing)])
    return table(rows, anchors)


def main(argv: list[str] | None = None) -> int:
    from engine_models import device_name
    from flux_models import TEXT_NOTE, build_flux_pipeline, parameter_count

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common_args(parser, "1,1c,4c,4")
    args = quick_args(parser.parse_args(argv))
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    began = time.perf_counter()
    pipe = build_flux_pipeline(device, dtype, quick=args.quick)
    print(f"# flux_train: {device_name(device)}, {dtype}, torch {torch.__version__}{' (quick)' if args.quick else ''}")
    print(f"# FLUX.1-dev transformer {parameter_count(pipe.transformer):,} parameters (built in {time.perf_counter() - began:.1f} s); "
          f"{TEXT_NOTE}; {args.size} px, LoRA rank {args.rank} on {'/'.join(LORA_TARGETS)}, {args.steps} steps per run "
          f"(median after {args.warmup}); peak memory includes the weights")
    print(run_all(pipe, "flux1", args, device, text_tokens=512), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
