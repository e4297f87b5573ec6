"""Adapter switching, active-adapter overhead and per-image batches: ours vs diffusers, one run.

On the real SD1.5 and SDXL UNet architectures (configs in studio/configs, random weights, fp16 on
GPU) with N random rank-r LoRAs on to_q / to_k / to_v / to_out.0, measures:

- switch latency A -> B: plain-torch merge floor (``W.add_(dW)`` per layer with precomputed dW),
  ours (studio.engine LiveWeights: ``W = W0 + dW`` from factors or cached dense dW), diffusers
  ``set_adapters``, hotswap (``load_lora_adapter(..., hotswap=True)`` after
  ``enable_lora_hotswap``) and fuse (unfuse + set_adapters + fuse);
- UNet forward time with an active adapter vs bare (ours merged; diffusers/peft unmerged);
- a batch of B images with B different adapters (ours, per-image hooks; LoRAs and a shared-basis
  collection) vs B images with one merged adapter.

Every ratio is against an anchor measured in the same run. Times: CUDA events after warm-up,
median of repeats (perf_counter on CPU).

    GPU:  python benchmarks/engine_switch.py
    CPU smoke test (shrunken UNets): python benchmarks/engine_switch.py --quick
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from studio.adapters.lora import LoraAdapter, LoraLayer  # noqa: E402
from studio.bases import CONFIG_DIR  # noqa: E402
from studio.engine.batched import per_image_hooks  # noqa: E402
from studio.engine.live import LiveWeights, PreparedCache, merge_plan  # noqa: E402
from studio.engine.mix import Mix, MixTerm  # noqa: E402

TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


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


# -- timing ---------------------------------------------------------------------------------------

def timed(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int) -> float:
    """Median milliseconds of ``fn`` (CUDA events on GPU)."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            samples.append(start.elapsed_time(end))
        else:
            began = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - began) * 1000)
    return statistics.median(samples)


# -- models and adapters --------------------------------------------------------------------------

def unet_config(arch: str, quick: bool) -> dict:
    config = json.loads((CONFIG_DIR / f"{arch}.json").read_text())["unet"]
    if not quick:
        return config
    blocks = len(config["block_out_channels"])
    config.update(block_out_channels=[40, 80, 160, 160][:blocks], layers_per_block=1, cross_attention_dim=64,
                  norm_num_groups=8, sample_size=8)
    if arch == "sdxl":
        config.update(transformer_layers_per_block=[1, 1, 1], addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 32)
    return config


def build_unet(config: dict, device: torch.device, dtype: torch.dtype):
    from diffusers import UNet2DConditionModel

    with torch.device(device):
        unet = UNet2DConditionModel.from_config(config)
    return unet.to(dtype=dtype).eval().requires_grad_(False)


def unet_inputs(unet, arch: str, batch: int, device: torch.device, dtype: torch.dtype) -> dict:
    config = unet.config
    size = config.sample_size
    generator = torch.Generator("cpu").manual_seed(0)
    inputs = {
        "sample": torch.randn(batch, config.in_channels, size, size, generator=generator).to(device, dtype),
        "timestep": torch.tensor(500, device=device),
        "encoder_hidden_states": torch.randn(batch, 77, config.cross_attention_dim, generator=generator).to(device, dtype),
    }
    if arch == "sdxl":
        text_dim = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        inputs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, text_dim, generator=generator).to(device, dtype),
            "time_ids": torch.tensor([[size * 8, size * 8, 0, 0, size * 8, size * 8]] * batch, device=device, dtype=dtype),
        }
    return inputs


def target_layers(unet) -> list[str]:
    return [name for name, _ in unet.named_modules() if name.endswith(TARGETS) and ".attn" in name]


def random_loras(unet, count: int, rank: int) -> list[LoraAdapter]:
    modules = dict(unet.named_modules())
    generator = torch.Generator("cpu").manual_seed(1)
    adapters = []
    for index in range(count):
        layers = {}
        for name in target_layers(unet):
            out_features, in_features = modules[name].weight.shape
            down = torch.randn(rank, in_features, generator=generator) / in_features ** 0.5
            up = torch.randn(out_features, rank, generator=generator) * 0.01
            layers[f"unet.{name}"] = LoraLayer(down, up, float(rank))
        adapters.append(LoraAdapter(f"lora{index}", layers))
    return adapters


@dataclass(eq=False)
class SharedMember:
    """A member of a shared-basis collection (the engine's SharedBasisAdapter protocol)."""

    name: str
    bases: dict
    cores: dict

    def layers(self) -> list[str]:
        return list(self.cores)

    def basis(self, layer: str):
        return self.bases[layer]

    def core(self, layer: str):
        return self.cores[layer]

    def factors(self, layer: str):
        down_basis, up_basis = self.bases[layer]
        return self.cores[layer] @ down_basis, up_basis

    def delta(self, layer: str):
        down, up = self.factors(layer)
        return up @ down


def shared_collection(loras: list[LoraAdapter], k: int) -> list[SharedMember]:
    generator = torch.Generator("cpu").manual_seed(2)
    bases = {}
    for layer, lora_layer in loras[0].lora_layers.items():
        out_features, in_features = lora_layer.out_features, lora_layer.in_features
        bases[layer] = (torch.linalg.qr(torch.randn(in_features, k, generator=generator))[0].T.contiguous(),
                        torch.linalg.qr(torch.randn(out_features, k, generator=generator))[0].contiguous())
    return [SharedMember(f"m{i}", bases, {layer: torch.randn(k, k, generator=generator) * 0.01 for layer in bases}) for i in range(len(loras))]


def peft_state_dict(adapter: LoraAdapter) -> dict[str, torch.Tensor]:
    """diffusers/peft keys without the ``unet.`` prefix (alpha = rank, so scale 1 like ours)."""
    state = {}
    for name, layer in adapter.lora_layers.items():
        module = name.partition(".")[2]
        state[f"{module}.lora_A.weight"] = layer.down
        state[f"{module}.lora_B.weight"] = layer.up * layer.scale
    return state


# -- measurements ---------------------------------------------------------------------------------

def measure_arch(arch: str, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> list[Row]:
    rows: list[Row] = []
    t = lambda fn, repeats=args.repeats: timed(fn, device, repeats, args.warmup)  # noqa: E731
    unet = build_unet(unet_config(arch, args.quick), device, dtype)
    loras = random_loras(unet, args.adapters, args.rank)
    live = LiveWeights({"unet": unet})
    weights = [live.live2d(layer) for layer in loras[0].layers()]
    pristine = [w.clone() for w in weights]
    print(f"[{arch}] {len(weights)} target layers, {sum(w.numel() for w in weights) / 1e6:.1f} M weights, "
          f"{args.adapters} LoRAs rank {args.rank}", file=sys.stderr, flush=True)

    # floor: plain-torch merge of precomputed dense dW
    dense = [[lora.delta(layer).to(device, dtype) for layer in lora.layers()] for lora in loras[:2]]
    state = {"i": 0}

    def floor_merge():
        state["i"] ^= 1
        for w, dw in zip(weights, dense[state["i"]]):
            w.add_(dw)

    with torch.no_grad():
        floor = t(floor_merge)
        for w, p in zip(weights, pristine):
            w.copy_(p)
    del dense
    rows.append(Row("switch", "plain-torch merge floor (W += dW)", floor, floor, "anchor"))

    for mode, cycle in (("auto", args.adapters), ("dense", min(args.adapters, 4))):
        cache = PreparedCache(1 << 40)
        mixes = [Mix((MixTerm(lora, 1.0, lora.name),)) for lora in loras[:cycle]]
        plans = [merge_plan(mix, [cache.get(lora, live, mode)]) for mix, lora in zip(mixes, loras)]
        state["i"] = 0

        def ours_switch(plans=plans):
            state["i"] = (state["i"] + 1) % len(plans)
            live.write(plans[state["i"]])

        label = "factors, addmm" if mode == "auto" else "cached dense dW"
        rows.append(Row("switch", f"ours ({label}; {cycle} adapters cycled)", t(ours_switch), floor, "<= 2x floor"))
        live.restore()
        del plans, cache

    inputs = unet_inputs(unet, arch, args.cfg_batch, device, dtype)
    forward = lambda: unet(**inputs)  # noqa: E731
    with torch.no_grad():
        cache = PreparedCache(1 << 40)
        plan = merge_plan(Mix((MixTerm(loras[0]),)), [cache.get(loras[0], live, "auto")])
        # Bare and merged forwards alternate in rounds so clock and thermal drift hit both alike.
        bare_rounds, merged_rounds = [], []
        for _ in range(args.rounds):
            bare_rounds.append(t(forward, args.forward_repeats))
            live.write(plan)
            merged_rounds.append(t(forward, args.forward_repeats))
            live.restore()
        bare, merged = statistics.median(bare_rounds), statistics.median(merged_rounds)
        rows.append(Row("active", f"bare UNet forward (batch {args.cfg_batch})", bare, bare, "anchor"))
        rows.append(Row("active", f"ours, adapter merged ({args.rounds} interleaved rounds)", merged, bare, "<= 1.02x"))
        rows += per_image_rows(arch, unet, live, loras, args, device, dtype, t)
    rows += diffusers_rows(unet, loras, args, inputs, floor, bare, t)
    del unet, live
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def per_image_rows(arch, unet, live, loras, args, device, dtype, t) -> list[Row]:
    inputs = unet_inputs(unet, arch, args.batch, device, dtype)
    forward = lambda: unet(**inputs)  # noqa: E731
    cache = PreparedCache(1 << 40)
    live.write(merge_plan(Mix((MixTerm(loras[0]),)), [cache.get(loras[0], live, "auto")]))
    one = t(forward, args.forward_repeats)
    live.restore()
    rows = [Row("per-image", f"batch {args.batch}, one adapter merged", one, one, "anchor")]
    assignments = [Mix((MixTerm(loras[i % len(loras)]),)) for i in range(args.batch)]
    with per_image_hooks(live.modules, assignments):
        rows.append(Row("per-image", f"batch {args.batch}, {args.batch} LoRAs (gathered bmm hooks)", t(forward, args.forward_repeats), one, "<= 1.15x"))
    members = shared_collection(loras[: args.batch], args.shared_k)
    with per_image_hooks(live.modules, [Mix((MixTerm(m),)) for m in members]):
        rows.append(Row("per-image", f"batch {args.batch}, {args.batch} members of a K={args.shared_k} shared basis", t(forward, args.forward_repeats), one, "<= 1.15x"))
    return rows


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
    lines = [f"\n## {arch}", "", "| group | what | ms | x anchor | target |", "|---|---|---:|---:|---|"]
    for row in rows:
        ms = f"{row.ms:.3f}" if row.ms is not None else "-"
        ratio = f"{row.ratio:.3f}" if row.ratio is not None else "-"
        target = row.target + (f" {row.note}" if row.note else "")
        lines.append(f"| {row.group} | {row.what} | {ms} | {ratio} | {target} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CPU smoke test: shrunken UNets, rank 4, few repeats")
    parser.add_argument("--arch", nargs="+", default=["sd15", "sdxl"], choices=["sd15", "sdxl"])
    parser.add_argument("--device", default=None)
    parser.add_argument("--adapters", type=int, default=20)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8, help="images in the per-image batch")
    parser.add_argument("--cfg-batch", type=int, default=2, help="UNet batch for the active-adapter overhead (CFG: 2)")
    parser.add_argument("--shared-k", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--forward-repeats", type=int, default=15)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved bare/merged rounds for the overhead")
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args(argv)
    if args.quick:
        torch.set_num_threads(1)  # steady numbers on a small shared CPU
        args.device = args.device or "cpu"
        args.rank, args.adapters = min(args.rank, 4), min(args.adapters, 4)
        args.repeats, args.forward_repeats, args.warmup, args.shared_k, args.batch = 5, 3, 1, 4, 4
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"# engine_switch: {name}, {dtype}, torch {torch.__version__}{' (quick)' if args.quick else ''}")
    for arch in args.arch:
        print(table(arch, measure_arch(arch, args, device, dtype)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
