"""Adapter switching, active-adapter overhead, per-image batches: through the engine's public API.

On the real SD1.5 and SDXL architectures (UNet and text encoders from studio/configs, the SD VAE;
random weights, fp16 on GPU; ``benchmarks/engine_models.py``) with N random rank-r LoRAs on
to_q / to_k / to_v / to_out.0 registered by name in an ``Engine`` with the default EngineConfig:

- switch: ``Engine.activate(name)`` cycling through the N names (what the app's /switch_adapter
  and every generate call run), against the plain-torch merge floor (``W.add_(dW)`` per layer with
  precomputed dense dW, one kernel per layer: the issue's anchor) and the HBM limit (rewriting the
  targeted weights once from pristine W0: read W0 + write W = 2 x their bytes, at --hbm-tbps;
  computed, not measured). Also without the finite check, a two-adapter mix, and diffusers'
  set_adapters / hotswap / fuse on the same UNet;
- active: UNet forward with an adapter merged by ``Engine.activate`` vs bare;
- per-image (UNet forward, B rows): ``with Engine.per_image(B names): unet(...)`` (LoRAs; members
  of a shared-basis collection) vs one adapter merged by ``Engine.activate``, each row checked
  against the merged forward of its own adapter (max |difference| in the note);
- generate (the user's path, whole call): ``Engine.generate`` of B images, one adapter per image
  (``per_image=True``) vs B images with one adapter.

Every ratio is against the anchor measured in the same run. Times: CUDA events after warm-up,
median of repeats (perf_counter on CPU; whole generate calls with a device sync).

    GPU:  python benchmarks/engine_switch.py --device cuda
    CPU smoke test (shrunken UNets): python benchmarks/engine_switch.py --quick
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchmarks_inputs import unet_inputs  # noqa: E402
from engine_models import build_pipeline, device_name, merge_floor, random_loras, shared_collection, timed  # noqa: E402

from studio.adapters.lora import LoraAdapter  # noqa: E402
from studio.engine import Engine, EngineConfig, GenerateRequest, NonFiniteUpdateError  # noqa: E402


@dataclass
class Row:
    group: str
    what: str
    ms: float | None
    anchor_ms: float | None
    target: str = ""
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if self.ms is None or not self.anchor_ms:
            return None
        return self.ms / self.anchor_ms


# -- switching ------------------------------------------------------------------------------------


def switch_rows(engine: Engine, names: list[str], loras: list[LoraAdapter], args, t) -> tuple[list[Row], float]:
    floor, weights = merge_floor(engine.pipe.unet, loras, t)
    target_bytes = sum(w.numel() * w.element_size() for w in weights)
    device = weights[0].device
    state = {"i": 0}
    hbm = 2 * target_bytes / (args.hbm_tbps * 1e12) * 1000
    rows = [Row("switch", "plain-torch merge floor (W += dW per layer, precomputed dense dW)", floor, floor, "anchor"),
            Row("switch", f"HBM limit: read W0 + write W once ({2 * target_bytes / 1e9:.2f} GB at {args.hbm_tbps} TB/s; computed)",
                hbm, floor, "", "not a measurement")]

    def cycle(fn):
        state["i"] = 0

        def step():
            state["i"] = (state["i"] + 1) % len(names)
            fn(names[state["i"]])
        return step

    first = []
    for name in names:  # the first activation of each adapter prepares its terms on the device
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        began = time.perf_counter()
        engine.activate(name)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        first.append((time.perf_counter() - began) * 1000)
    rows.append(Row("switch", "first Engine.activate(name) of each adapter (prepare on the device + merge; extra)",
                    statistics.median(first), floor, "", "once per adapter, then cached"))
    ours = t(cycle(engine.activate))
    rows.append(Row("switch", f"Engine.activate(name), {len(names)} registered, default EngineConfig", ours, floor,
                    "<= 2x floor", f"{ours / hbm:.1f}x the HBM limit; {len(engine.live.groups)} weight groups"))
    engine.config.check_finite = False
    unchecked = t(cycle(engine.activate))
    engine.config.check_finite = True
    rows.append(Row("switch", "Engine.activate(name), check_finite=False (extra: the finite check's cost)", unchecked, floor))
    pairs = t(cycle(lambda name: engine.activate([name, (names[0], 0.5)])))
    rows.append(Row("switch", "Engine.activate([name, (first, 0.5)]) (extra: a two-adapter mix)", pairs, floor))
    engine.restore()
    return rows, floor


# -- merged overhead, per-image batches -------------------------------------------------------------


def active_rows(engine: Engine, arch: str, names: list[str], args, device, dtype, t) -> tuple[list[Row], float]:
    unet = engine.pipe.unet
    inputs = unet_inputs(unet, arch, args.cfg_batch, device, dtype)
    forward = lambda: unet(**inputs)  # noqa: E731
    bare_rounds, merged_rounds = [], []
    with torch.no_grad():
        for _ in range(args.rounds):  # alternate so clock drift hits both alike
            engine.restore()
            bare_rounds.append(t(forward, args.forward_repeats))
            engine.activate(names[0])
            merged_rounds.append(t(forward, args.forward_repeats))
    engine.restore()
    bare, merged = statistics.median(bare_rounds), statistics.median(merged_rounds)
    return [Row("active", f"bare UNet forward (batch {args.cfg_batch})", bare, bare, "anchor"),
            Row("active", f"UNet forward after Engine.activate(name) ({args.rounds} interleaved rounds)", merged, bare, "<= 1.02x")], bare


def per_image_rows(engine: Engine, arch: str, names: list[str], loras, args, device, dtype, t) -> list[Row]:
    unet = engine.pipe.unet
    inputs = unet_inputs(unet, arch, args.batch, device, dtype)
    forward = lambda: unet(**inputs)  # noqa: E731
    chosen = [names[i % len(names)] for i in range(args.batch)]
    with torch.no_grad():
        engine.activate(chosen[0])
        one = t(forward, args.forward_repeats)
        merged_outputs = {}
        for name in dict.fromkeys(chosen[:2]):
            engine.activate(name)
            merged_outputs[name] = forward().sample.float()
        engine.restore()
        rows = [Row("per-image", f"batch {args.batch}, one adapter (Engine.activate)", one, one, "anchor")]
        with engine.per_image(chosen):
            ms = t(forward, args.forward_repeats)
            out = forward().sample.float()
        error = max(float((out[i] - merged_outputs[chosen[i]][i]).abs().max()) for i in range(2))
        rows.append(Row("per-image", f"batch {args.batch}, {args.batch} LoRAs (Engine.per_image)", ms, one, "<= 1.15x",
                        f"max |per-image - merged| {error:.2e}"))
        members = shared_collection(loras[: args.batch], args.shared_k)
        for member in members:
            engine.register(member.name, member)
        with engine.per_image([m.name for m in members]):
            ms = t(forward, args.forward_repeats)
        rows.append(Row("per-image", f"batch {args.batch}, {args.batch} members of a K={args.shared_k} shared basis (Engine.per_image)",
                        ms, one, "<= 1.15x"))
    return rows


def generate_rows(engine: Engine, names: list[str], args, device) -> list[Row]:
    """The user's whole call: B images with B adapters vs B images with one."""
    def call(request: GenerateRequest) -> float:
        samples = []
        for index in range(args.generate_repeats + 1):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            began = time.perf_counter()
            engine.generate(request)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if index:  # the first call is warm-up
                samples.append((time.perf_counter() - began) * 1000)
        return statistics.median(samples)

    size = args.size or None
    common = dict(prompt="a red circle on a white background", steps=args.steps, width=size, height=size, seed=0)
    one = call(GenerateRequest(adapters=[names[0]], batch=args.batch, **common))
    many = call(GenerateRequest(adapters=[names[i % len(names)] for i in range(args.batch)], per_image=True, **common))
    width, height = engine.size_of(GenerateRequest(prompt="x", width=size, height=size))
    what = f"{args.batch} images {width}x{height}, {args.steps} steps"
    return [Row("generate", f"Engine.generate: {what}, one adapter", one, one, "anchor"),
            Row("generate", f"Engine.generate(per_image=True): {what}, {args.batch} adapters", many, one, "<= 1.15x")]


# -- diffusers, on the same UNet (peft layers injected: after ours) -------------------------------


def peft_state_dict(adapter: LoraAdapter) -> dict[str, torch.Tensor]:
    """diffusers/peft keys without the ``unet.`` prefix (alpha = rank, so scale 1 like ours)."""
    state = {}
    for name, layer in adapter.lora_layers.items():
        module = name.partition(".")[2]
        state[f"{module}.lora_A.weight"] = layer.down
        state[f"{module}.lora_B.weight"] = layer.up * layer.scale
    return state


def diffusers_rows(unet, loras, args, inputs, floor, bare, t) -> list[Row]:
    """diffusers' own paths on the same UNet (peft layers injected now; ours is done)."""
    rows = []
    states = [peft_state_dict(lora) for lora in loras]
    try:
        unet.enable_lora_hotswap(target_rank=args.rank)
        unet.load_lora_adapter(states[0], adapter_name="hot", prefix=None)
        state = {"i": 0}

        def hotswap():
            state["i"] = (state["i"] + 1) % len(states)
            unet.load_lora_adapter(states[state["i"]], adapter_name="hot", prefix=None, hotswap=True)

        rows.append(Row("switch", "diffusers hotswap (load_lora_adapter hotswap=True)", t(hotswap, max(3, args.repeats // 2)), floor))
        unet.delete_adapters("hot")
    except Exception as error:  # noqa: BLE001 - a failed baseline is reported, not fatal
        rows.append(Row("switch", "diffusers hotswap", None, floor, note=f"failed: {type(error).__name__}: {error}"[:120]))
    try:
        names = [f"a{i}" for i in range(len(states))]
        for name, state_dict in zip(names, states):
            unet.load_lora_adapter(state_dict, adapter_name=name, prefix=None)
        state = {"i": 0}

        def set_adapters():
            state["i"] = (state["i"] + 1) % len(names)
            unet.set_adapters([names[state["i"]]])

        rows.append(Row("switch", "diffusers set_adapters", t(set_adapters), floor))
        with torch.no_grad():
            unet.set_adapters([names[0]])
            rows.append(Row("active", "diffusers/peft, adapter active (unfused)", t(lambda: unet(**inputs), args.forward_repeats), bare))
            unet.fuse_lora(adapter_names=[names[0]])

            def refuse():
                state["i"] = (state["i"] + 1) % len(names)
                unet.unfuse_lora()
                unet.set_adapters([names[state["i"]]])
                unet.fuse_lora(adapter_names=[names[state["i"]]])

            rows.append(Row("switch", "diffusers unfuse + set_adapters + fuse", t(refuse, max(3, args.repeats // 2)), floor))
            unet.unfuse_lora()
    except Exception as error:  # noqa: BLE001
        rows.append(Row("switch", "diffusers set_adapters / fuse", None, floor, note=f"failed: {type(error).__name__}: {error}"[:120]))
    return rows




def table(arch: str, rows: list[Row]) -> str:
    lines = [f"\n## {arch}", "", "| group | what (public API call timed) | ms | x anchor | target | note |", "|---|---|---:|---:|---|---|"]
    for row in rows:
        ms = f"{row.ms:.3f}" if row.ms is not None else "-"
        ratio = f"{row.ratio:.3f}" if row.ratio is not None else "-"
        lines.append(f"| {row.group} | {row.what} | {ms} | {ratio} | {row.target} | {row.note} |")
    return "\n".join(lines)


def measure_arch(arch: str, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> list[Row]:
    t = lambda fn, repeats=args.repeats: timed(fn, device, repeats, args.warmup)  # noqa: E731
    pipe = build_pipeline(arch, device, dtype, quick=args.quick)
    engine = Engine(pipe, arch, EngineConfig(device=str(device), dtype=str(dtype).removeprefix("torch.")))
    loras = random_loras(pipe.unet, args.adapters, args.rank)
    names = [engine.register(lora.name, lora) for lora in loras]
    print(f"[{arch}] {len(loras[0].layers())} target layers, {args.adapters} LoRAs rank {args.rank}", file=sys.stderr, flush=True)
    rows, floor = switch_rows(engine, names, loras, args, t)
    active, bare = active_rows(engine, arch, names, args, device, dtype, t)
    rows += active + per_image_rows(engine, arch, names, loras, args, device, dtype, t)
    if args.steps > 0:
        try:
            rows += generate_rows(engine, names, args, device)
        except NonFiniteUpdateError as error:  # random weights can overflow in fp16: say so, keep the other rows
            rows.append(Row("generate", "Engine.generate rows", None, None, "", f"not measured: {error} (try --dtype bfloat16)"[:160]))
    engine.release()
    inputs = unet_inputs(pipe.unet, arch, args.cfg_batch, device, dtype)
    if not args.skip_diffusers:
        rows += diffusers_rows(pipe.unet, loras, args, inputs, floor, bare, t)
    del engine, pipe
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CPU smoke test: shrunken UNets, rank 4, few repeats")
    parser.add_argument("--arch", nargs="+", default=["sd15", "sdxl"], choices=["sd15", "sdxl"])
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None, choices=["float16", "bfloat16", "float32"], help="default: float16 on cuda, float32 on cpu")
    parser.add_argument("--adapters", type=int, default=20)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8, help="images in the per-image batch")
    parser.add_argument("--cfg-batch", type=int, default=2, help="UNet batch for the active-adapter overhead (CFG: 2)")
    parser.add_argument("--shared-k", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--forward-repeats", type=int, default=15)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved bare/merged rounds for the overhead")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20, help="denoising steps of the generate rows (0: skip them)")
    parser.add_argument("--size", type=int, default=0, help="image side of the generate rows (0: the base's native size)")
    parser.add_argument("--generate-repeats", type=int, default=2)
    parser.add_argument("--hbm-tbps", type=float, default=4.3, help="memory bandwidth for the computed HBM-limit row (H200: 4.3)")
    parser.add_argument("--skip-diffusers", action="store_true", help="leave out diffusers' set_adapters / hotswap / fuse rows")
    args = parser.parse_args(argv)
    if args.quick:
        torch.set_num_threads(1)  # steady numbers on a small shared CPU
        args.device = args.device or "cpu"
        args.rank, args.adapters = min(args.rank, 4), min(args.adapters, 20)
        args.repeats, args.forward_repeats, args.warmup, args.shared_k, args.batch = 5, 3, 1, 4, 4
        args.rounds, args.steps, args.generate_repeats = 2, min(args.steps, 2), 1
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float16 if device.type == "cuda" else torch.float32)
    print(f"# engine_switch: {device_name(device)}, {dtype}, torch {torch.__version__}{' (quick)' if args.quick else ''}")
    for arch in args.arch:
        print(table(arch, measure_arch(arch, args, device, dtype)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
