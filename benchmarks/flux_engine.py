"""FLUX.1-dev engine benchmark: adapter load, switch, active-adapter step, per-image batches, vs diffusers.

The real FLUX.1-dev transformer architecture (studio/configs/flux1.json, ~12 B parameters, random
bf16 weights built directly on the GPU; ``benchmarks/flux_models.py``; the text encoders are small
stand-ins with the real output widths, said in the output) in an ``Engine`` with the default
EngineConfig, N random rank-r LoRAs on every attention projection (double blocks: to_q/k/v,
to_out.0, add_q/k/v_proj, to_add_out; single blocks: to_q/k/v), written as diffusers LoRA files.

- load: ``Engine.activate(FILE)`` the first time (read, place on the pipeline's modules, prepare,
  merge) vs diffusers ``FluxPipeline.load_lora_weights(FILE)`` + ``set_adapters``;
- switch: ``Engine.activate(name)`` cycling through N registered names vs the plain-torch merge
  floor (``W.add_(dW)`` per layer, dense dW precomputed: the anchor), diffusers ``set_adapters``,
  hotswap (``load_lora_adapter(hotswap=True)``) and unfuse + set_adapters + fuse;
- active: one transformer forward at 1024x1024 (4096 image + 512 text tokens, batch 1, guidance
  embedding) with an adapter merged by ``Engine.activate`` vs bare (target <= 1.02x), and with
  diffusers' unfused peft LoRA active;
- per-image: a batch of 4, ``Engine.per_image([4 names])`` vs one adapter merged (target <= 1.15x);
- generate: ``Engine.generate`` of 4 images, one adapter per image vs one adapter (whole call).

Every ratio is against an anchor measured in the same run (CUDA events after warm-up, medians).

    GPU:  python benchmarks/flux_engine.py --device cuda
    CPU smoke test (shrunken transformer): python benchmarks/flux_engine.py --quick
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine_models import device_name, merge_floor, timed  # noqa: E402
from engine_switch import Row, peft_state_dict  # noqa: E402
from flux_models import TEXT_NOTE, attention_layers, build_flux_pipeline, parameter_count, random_loras  # noqa: E402

from studio.bases.conditioning import PromptEmbeds, denoiser_kwargs  # noqa: E402
from studio.engine import Engine, EngineConfig, GenerateRequest, NonFiniteUpdateError  # noqa: E402
from studio.formats import save_adapter  # noqa: E402


def transformer_inputs(pipe, batch: int, side: int, device, dtype, text_tokens: int = 512) -> dict:
    """Keyword arguments of one FLUX transformer call at ``side`` px, the pipeline's way (``denoiser_kwargs``)."""
    config = pipe.transformer.config
    latent = side // pipe.vae_scale_factor
    generator = torch.Generator("cpu").manual_seed(0)
    latents = torch.randn(batch, config.in_channels // 4, latent, latent, generator=generator).to(device, dtype)
    sequence = torch.randn(batch, text_tokens, config.joint_attention_dim, generator=generator).to(device, dtype)
    pooled = torch.randn(batch, config.pooled_projection_dim, generator=generator).to(device, dtype)
    embeds = PromptEmbeds(sequence, pooled, torch.zeros(text_tokens, 3, device=device, dtype=dtype))
    return denoiser_kwargs(pipe, latents, torch.full((batch,), 500.0, device=device), embeds, 3.5)


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _once(fn, device) -> float:
    _sync(device)
    began = time.perf_counter()
    fn()
    _sync(device)
    return (time.perf_counter() - began) * 1000


def load_rows(engine: Engine, files: list[Path], device) -> list[Row]:
    """First activation of each LoRA file (read + place + prepare + merge), median over the files."""
    times = [_once(lambda f=f: engine.activate(str(f)), device) for f in files]
    engine.restore()
    return [Row("load", "Engine.activate(FILE) first time: read + place + prepare + merge (median over files)",
                statistics.median(times), statistics.median(times), "anchor")]


def switch_rows(engine: Engine, names: list[str], loras, args, t) -> tuple[list[Row], float]:
    floor, weights = merge_floor(engine.pipe.transformer, loras, t)
    target_bytes = sum(w.numel() * w.element_size() for w in weights)
    rows = [Row("switch", f"plain-torch merge floor (W += dW per layer, {len(weights)} layers, {target_bytes / 1e9:.2f} GB)", floor, floor, "anchor")]
    state = {"i": 0}
    for name in names:  # first activation prepares each adapter's terms on the device
        engine.activate(name)

    def cycle():
        state["i"] = (state["i"] + 1) % len(names)
        engine.activate(names[state["i"]])

    ours = t(cycle)
    rows.append(Row("switch", f"Engine.activate(name), {len(names)} registered, default EngineConfig", ours, floor, "<= 2x floor",
                    f"{len(engine.live.groups)} weight groups"))
    engine.restore()
    return rows, floor


def active_rows(engine: Engine, name: str, inputs: dict, args, t) -> tuple[list[Row], float]:
    transformer = engine.pipe.transformer
    forward = lambda: transformer(**inputs)  # noqa: E731
    bare_rounds, merged_rounds = [], []
    with torch.no_grad():
        for _ in range(args.rounds):  # interleaved so clock drift hits both alike
            engine.restore()
            bare_rounds.append(t(forward, args.forward_repeats))
            engine.activate(name)
            merged_rounds.append(t(forward, args.forward_repeats))
    engine.restore()
    bare, merged = statistics.median(bare_rounds), statistics.median(merged_rounds)
    what = f"transformer forward, {args.size}x{args.size}, batch 1"
    return [Row("active", f"bare {what} (anchor)", bare, bare, "anchor"),
            Row("active", f"{what} after Engine.activate(name) ({args.rounds} interleaved rounds)", merged, bare, "<= 1.02x")], bare


def per_image_rows(engine: Engine, names: list[str], args, device, dtype, t) -> list[Row]:
    transformer = engine.pipe.transformer
    inputs = transformer_inputs(engine.pipe, args.batch, args.size, device, dtype)
    forward = lambda: transformer(**inputs)  # noqa: E731
    chosen = [names[i % len(names)] for i in range(args.batch)]
    with torch.no_grad():
        engine.activate(chosen[0])
        one = t(forward, args.forward_repeats)
        reference = forward()[0].float()
        engine.restore()
        with engine.per_image(chosen):
            ms = t(forward, args.forward_repeats)
            out = forward()[0].float()
    error = float((out[0] - reference[0]).abs().max())
    return [Row("per-image", f"batch {args.batch}, one adapter (Engine.activate)", one, one, "anchor"),
            Row("per-image", f"batch {args.batch}, {args.batch} LoRAs (Engine.per_image)", ms, one, "<= 1.15x",
                f"image 0 vs merged: max |diff| {error:.2e}")]


def generate_rows(engine: Engine, names: list[str], args, device) -> list[Row]:
    common = dict(prompt="a red circle on a white background", steps=args.steps, width=args.size, height=args.size, seed=0)
    try:
        engine.generate(GenerateRequest(adapters=[names[0]], batch=1, **{**common, "steps": 1}))  # warm-up
        one = _once(lambda: engine.generate(GenerateRequest(adapters=[names[0]], batch=args.batch, **common)), device)
        many = _once(lambda: engine.generate(GenerateRequest(adapters=[names[i % len(names)] for i in range(args.batch)],
                                                             per_image=True, **common)), device)
    except NonFiniteUpdateError as error:  # random bf16 weights may overflow: say so, keep the other rows
        return [Row("generate", "Engine.generate rows", None, None, "", f"not measured: {error}"[:160])]
    what = f"{args.batch} images {args.size}x{args.size}, {args.steps} steps"
    return [Row("generate", f"Engine.generate: {what}, one adapter", one, one, "anchor"),
            Row("generate", f"Engine.generate(per_image=True): {what}, {args.batch} adapters", many, one, "<= 1.15x")]


def diffusers_rows(pipe, files: list[Path], loras, args, inputs, anchors: dict[str, float], t, device) -> list[Row]:
    """diffusers' own paths on the same pipeline (peft layers injected now; ours is done)."""
    rows = []
    transformer = pipe.transformer
    names = [f"d{i}" for i in range(len(files))]
    try:
        times = [_once(lambda f=f, n=n: (pipe.load_lora_weights(str(f), adapter_name=n), pipe.set_adapters([n])), device)
                 for f, n in zip(files, names)]
        rows.append(Row("load", "diffusers FluxPipeline.load_lora_weights(FILE) + set_adapters (median over files)",
                        statistics.median(times), anchors["load"]))
        state = {"i": 0}

        def set_adapters():
            state["i"] = (state["i"] + 1) % len(names)
            pipe.set_adapters([names[state["i"]]])

        rows.append(Row("switch", "diffusers set_adapters", t(set_adapters), anchors["switch"]))
        with torch.no_grad():
            pipe.set_adapters([names[0]])
            rows.append(Row("active", "diffusers/peft, adapter active (unfused)", t(lambda: transformer(**inputs), args.forward_repeats),
                            anchors["active"]))
            pipe.fuse_lora(adapter_names=[names[0]])

            def refuse():
                state["i"] = (state["i"] + 1) % len(names)
                pipe.unfuse_lora()
                pipe.set_adapters([names[state["i"]]])
                pipe.fuse_lora(adapter_names=[names[state["i"]]])

            rows.append(Row("switch", "diffusers unfuse_lora + set_adapters + fuse_lora", t(refuse, max(3, args.repeats // 3)), anchors["switch"]))
            pipe.unfuse_lora()
        pipe.delete_adapters(names)
    except Exception as error:  # noqa: BLE001 - a failed baseline is reported, not fatal
        rows.append(Row("switch", "diffusers load / set_adapters / fuse", None, anchors["switch"], note=f"failed: {type(error).__name__}: {error}"[:140]))
    rows += hotswap_rows(transformer, loras, args, anchors["switch"], t)
    return rows


def hotswap_rows(transformer, loras, args, floor: float, t) -> list[Row]:
    states = [peft_state_dict(lora) for lora in loras]  # keys without "transformer.", alpha = rank (scale 1)
    try:
        transformer.enable_lora_hotswap(target_rank=args.rank)
        transformer.load_lora_adapter(states[0], adapter_name="hot", prefix=None)
        state = {"i": 0}

        def hotswap():
            state["i"] = (state["i"] + 1) % len(states)
            transformer.load_lora_adapter(states[state["i"]], adapter_name="hot", prefix=None, hotswap=True)

        return [Row("switch", "diffusers hotswap (load_lora_adapter hotswap=True)", t(hotswap, max(3, args.repeats // 3)), floor)]
    except Exception as error:  # noqa: BLE001
        return [Row("switch", "diffusers hotswap", None, floor, note=f"failed: {type(error).__name__}: {error}"[:140])]


def table(rows: list[Row]) -> str:
    lines = ["| group | what (public API call timed) | ms | x anchor | target | note |", "|---|---|---:|---:|---|---|"]
    for row in rows:
        ms = f"{row.ms:.3f}" if row.ms is not None else "-"
        ratio = f"{row.ratio:.3f}" if row.ratio is not None else "-"
        lines.append(f"| {row.group} | {row.what} | {ms} | {ratio} | {row.target} | {row.note} |")
    return "\n".join(lines)


def run(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> list[Row]:
    t = lambda fn, repeats=args.repeats: timed(fn, device, repeats, args.warmup)  # noqa: E731
    began = time.perf_counter()
    pipe = build_flux_pipeline(device, dtype, quick=args.quick)
    _sync(device)
    print(f"# FLUX.1-dev transformer: {parameter_count(pipe.transformer):,} parameters, built in "
          f"{time.perf_counter() - began:.1f} s; {TEXT_NOTE}", flush=True)
    engine = Engine(pipe, "flux1", EngineConfig(device=str(device), dtype=str(dtype).removeprefix("torch.")))
    loras = random_loras(pipe.transformer, args.adapters, args.rank)
    print(f"# {len(attention_layers(pipe.transformer))} target layers, {args.adapters} LoRAs rank {args.rank}", flush=True)
    with tempfile.TemporaryDirectory() as folder:
        files = [save_adapter(lora, Path(folder) / f"{lora.name}.safetensors", format="diffusers") for lora in loras[: args.files]]
        rows = load_rows(engine, files, device)
        names = [engine.register(lora.name, lora) for lora in loras]
        switch, floor = switch_rows(engine, names, loras, args, t)
        inputs = transformer_inputs(pipe, 1, args.size, device, dtype)
        active, bare = active_rows(engine, names[0], inputs, args, t)
        rows += switch + active + per_image_rows(engine, names, args, device, dtype, t)
        if args.steps:
            rows += generate_rows(engine, names, args, device)
        engine.release()
        del engine
        if not args.skip_diffusers:
            anchors = {"load": rows[0].ms, "switch": floor, "active": bare}
            rows += diffusers_rows(pipe, files, loras, args, inputs, anchors, t, device)
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CPU smoke test: shrunken transformer, rank 4, few repeats")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--files", type=int, default=3, help="LoRA files for the load rows")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=4, help="images of the per-image batch")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--forward-repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved bare/merged rounds for the overhead")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4, help="denoising steps of the generate rows (0: skip them)")
    parser.add_argument("--skip-diffusers", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        torch.set_num_threads(1)
        args.device = args.device or "cpu"
        args.dtype = "float32"
        args.rank, args.adapters, args.files, args.size = 4, 4, 2, 64
        args.repeats, args.forward_repeats, args.rounds, args.warmup, args.steps = 3, 2, 2, 1, min(args.steps, 2)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype)
    print(f"# flux_engine: {device_name(device)}, {dtype}, torch {torch.__version__}{' (quick)' if args.quick else ''}")
    print(table(run(args, device, dtype)), flush=True)
    if device.type == "cuda":
        print(f"# peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
