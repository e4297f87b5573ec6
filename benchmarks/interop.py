"""Producer x consumer interop table: does each tool apply what a LoRA file holds, layer for layer?

Producers (on the SD1.5 and SDXL module trees): the real files in ../shared/loras as published,
a kohya-written-style LoCon file (kohya's own SD1 / SDXL names, conv layers on the resnets), a
peft-written file (peft's own ``save_pretrained`` on the architecture's UNet, lora_alpha != r,
alpha in ``adapter_config.json``), and LoKr files (the real one; a synthetic SDXL one with conv
layers) - each as published and as the studio's kohya and diffusers exports.
On FLUX.1-dev (the real architecture, weightless): two files in sd-scripts' own ``lora_flux``
layout (tests/formats/flux_files.py: BFL names, fused qkv / linear1, CLIP-L ``lora_te1_``, T5
``lora_te3_``, ``in_dims`` layers; one saved with ``split_qkv``), a peft ``save_pretrained`` file
on a weightless FluxTransformer2DModel at the FLUX.1-dev config, and a LoKr file in LyCORIS'
naming (which the studio refuses: FLUX LyCORIS layers are not converted).

Consumers (``studio.formats.consumers``, each modelled from reading its loader's source; diffusers
is its own loader run on weightless modules): kohya sd-scripts, ComfyUI, A1111, diffusers. A cell
is "layers applied / layers expected, max relative dW error over the applied layers", against the
studio's reading of the file (itself checked against the producing tool's math in
tests/formats/test_faithful.py). "refused" means the loader rejects the whole file.
Exports of LyCORIS files also state their conversion error against the LyCORIS dW.

    python benchmarks/interop.py                 # writes docs/interop.md (CPU, a few minutes)
    python benchmarks/interop.py --arch sd15     # one architecture
SD3: add its tree to ARCHS once its consumers are modelled.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from studio.bases import architecture_tree  # noqa: E402
from studio.errors import StudioError  # noqa: E402
from studio.formats import load_adapter, save_adapter  # noqa: E402
from studio.formats.consumers import TOOL_LABELS, TOOLS, adapter_deltas, fidelity, kohya_network_names, read_as  # noqa: E402
from studio.formats.consumers import _hollow, _meta_components  # noqa: E402

ARCHS = ("sd15", "sdxl", "flux1")
SHARED = next((p / "shared" / "loras" for p in Path(__file__).resolve().parents if (p / "shared" / "loras").is_dir()), Path("shared/loras"))


def kohya_written(tree, folder: Path, rank: int = 4, seed: int = 0) -> Path:
    """A LoCon file with kohya's own names for every module its LoRA network targets (alpha = rank / 2)."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for stem, module in kohya_network_names(tree).items():
        out, *rest = tree.modules[module].weight_shape
        tensors[f"{stem}.lora_down.weight"] = (torch.randn(rank, *rest, generator=g) * 0.01).half()
        tensors[f"{stem}.lora_up.weight"] = (torch.randn(out, rank, *([1, 1] if len(rest) == 3 else []), generator=g) * 0.01).half()
        tensors[f"{stem}.alpha"] = torch.tensor(rank / 2, dtype=torch.float16)
    path = folder / f"{tree.arch}_kohya_written_locon.safetensors"
    save_file(tensors, path, metadata={"ss_network_module": "networks.lora", "ss_network_dim": str(rank),
                                       "ss_network_alpha": str(rank / 2), "sshs_model_hash": "stale", "sshs_legacy_hash": "stale"})
    return path


def lokr_written(tree, folder: Path, seed: int = 1) -> Path:
    """A LoKr file (LyCORIS naming and factor layout) on attention and resnet convs: w1 full, w2 low-rank."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for stem, module in kohya_network_names(tree).items():
        if not any(part in module for part in ("attn1.to_q", "attn2.to_k", "resnets.0.conv1")):
            continue
        out, inp, *kernel = tree.modules[module].weight_shape
        w2_b = torch.randn(8, inp // 4, *kernel, generator=g) * 0.05
        tensors.update({f"{stem}.lokr_w1": torch.randn(4, 4, generator=g), f"{stem}.lokr_w2_a": torch.randn(out // 4, 8, generator=g) * 0.05,
                        f"{stem}.lokr_w2_b": w2_b, f"{stem}.alpha": torch.tensor(8.0)})
    path = folder / f"{tree.arch}_lokr_synthetic.safetensors"
    save_file(tensors, path, metadata={"ss_network_module": "lycoris.kohya", "ss_network_args": '{"algo": "lokr"}'})
    return path


def peft_written(tree, folder: Path) -> Path:
    """peft's own ``get_peft_model(...).save_pretrained`` on the architecture's UNet (weightless base)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(2)
    unet = _meta_components(tree)["unet"]
    config = LoraConfig(r=4, lora_alpha=2, init_lora_weights=False, target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out"],
                        alpha_pattern={"attn2.to_k": 6})
    model = get_peft_model(unet, config)
    out = folder / f"{tree.arch}_peft"
    model.save_pretrained(out)
    return out / "adapter_model.safetensors"


def kohya_flux_written(folder: Path, split_qkv: bool) -> Path:
    """sd-scripts' lora_flux layout at FLUX.1-dev size: blocks, in_dims layers, CLIP-L and (without split_qkv) T5, bf16."""
    from tests.formats.flux_files import write_kohya_flux  # repository root is on sys.path (above)

    encoders = ("clip",) if split_qkv else ("clip", "t5")
    name = "split_qkv" if split_qkv else "te3"
    return write_kohya_flux(folder / f"flux1_kohya_written_{name}.safetensors", rank=4, alpha=2.0, split_qkv=split_qkv,
                            text_encoders=encoders, in_layers=True)


def peft_flux_written(folder: Path) -> Path:
    """peft's ``save_pretrained`` on a weightless FluxTransformer2DModel at the FLUX.1-dev config."""
    from peft import LoraConfig, get_peft_model

    from studio.bases.meta import arch_config, denoiser_on_meta

    torch.manual_seed(2)
    transformer = denoiser_on_meta(arch_config("flux1")["transformer"])
    _hollow(transformer)
    targets = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "ff.net.0.proj", "ff.net.2",
               "norm_out.linear", "proj_out"]  # not proj_mlp: linear1 half filled
    config = LoraConfig(r=4, lora_alpha=2, init_lora_weights=False, target_modules=targets, alpha_pattern={"add_k_proj": 6})
    out = folder / "flux1_peft"
    get_peft_model(transformer, config).save_pretrained(out)
    return out / "adapter_model.safetensors"


def lokr_flux_written(folder: Path, seed: int = 1) -> Path:
    """A LoKr file in LyCORIS' kohya-style naming on FLUX's fused qkv and linear2 (w1 full, w2 low-rank)."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for stem, (out, inp) in {"lora_unet_double_blocks_0_img_attn_qkv": (9216, 3072), "lora_unet_single_blocks_0_linear2": (3072, 15360)}.items():
        tensors.update({f"{stem}.lokr_w1": torch.randn(4, 4, generator=g), f"{stem}.lokr_w2_a": torch.randn(out // 4, 8, generator=g) * 0.05,
                        f"{stem}.lokr_w2_b": torch.randn(8, inp // 4, generator=g) * 0.05, f"{stem}.alpha": torch.tensor(8.0)})
    path = folder / "flux1_lokr_synthetic.safetensors"
    save_file(tensors, path, metadata={"ss_network_module": "lycoris.kohya", "ss_network_args": '{"algo": "lokr"}'})
    return path


def producers(arch: str, folder: Path) -> list[tuple[str, Path]]:
    if arch == "flux1":
        return [("kohya-written (lora_flux names, CLIP-L + T5)", kohya_flux_written(folder, split_qkv=False)),
                ("kohya-written (split_qkv, CLIP-L)", kohya_flux_written(folder, split_qkv=True)),
                ("peft save_pretrained", peft_flux_written(folder)), ("LoKr (synthetic, LyCORIS names)", lokr_flux_written(folder))]
    tree = architecture_tree(arch)
    files = [("kohya-written LoCon (synthetic)", kohya_written(tree, folder)), ("peft save_pretrained", peft_written(tree, folder)),
             ("LoKr (synthetic, conv)", lokr_written(tree, folder))]
    if arch == "sd15" and SHARED.is_dir():
        for path in sorted(SHARED.glob("sd1*.safetensors")):
            files.append((f"real: {path.stem}", path))
    return files


def cell(result) -> str:
    if result.unsupported:
        return result.refused
    if result.refused:
        return "refused"
    if result.native:
        return f"{result.native}/{result.expected} own LyCORIS code"
    return f"{result.applied}/{result.expected}, {result.max_error:.0e}" if result.applied else f"0/{result.expected}"


def rows_for(arch: str, folder: Path) -> list[list[str]]:
    tree, rows = architecture_tree(arch), []
    for label, path in producers(arch, folder):
        try:
            adapter = load_adapter(path, arch)
        except StudioError as error:
            why = str(error).replace(f"{path}: ", "")
            rows.append([arch, label, "as published", f"studio refuses: {why[:110]}", "", "", "", ""])
            continue
        expected = adapter_deltas(adapter)
        conversion = next((n.split("relative error ")[1] for n in adapter.notes if "LyCORIS layers" in n), "exact")
        variants = [("as published", path)]
        for layout in ("kohya", "diffusers"):
            variants.append((f"studio {layout} export", save_adapter(adapter, folder / f"{path.stem}.{layout}.safetensors", layout)))
        for variant, file in variants:
            published = variant == "as published"
            cells = [cell(fidelity(read_as(tool, file, tree), expected)) for tool in TOOLS]
            rows.append([arch, label, variant, *cells, "" if published else conversion])
        print(f"{arch} {label}: done", file=sys.stderr, flush=True)
    return rows


def markdown(rows: list[list[str]], seconds: float) -> str:
    head = ["arch", "producer", "file", *(TOOL_LABELS[t] for t in TOOLS), "export vs source"]
    lines = ["# Interop: which layers each tool applies, and how exactly", "",
             "Generated by `python benchmarks/interop.py` (CPU, "
             f"{seconds:.0f} s). Cell: layers applied / layers the file holds, max relative dW error over the "
             "applied layers, against the studio's reading of the file (checked against the producing tool's math in "
             "`tests/formats/test_faithful.py`). Consumers are modelled from their loaders' source "
             "(`studio/formats/consumers.py`); diffusers is its own loader run on weightless modules. "
             "kohya's network does not target conv_in / conv_out / time and add embeddings, so exports of "
             "files holding those show fewer layers there by design. \"export vs source\": the conversion error of "
             "LyCORIS layers (mean, max) against the LyCORIS dW; LoRA exports are exact.", "",
             "FLUX.1 (FLUX.1-dev module tree): layers are the studio's diffusers modules; kohya's and ComfyUI's patches on "
             "BFL's fused `img_attn.qkv` / `txt_attn.qkv` / `linear1` (and the swapped `final_layer.adaLN_modulation.1`) "
             "are split by rows and each projection compared with the studio's own dW. kohya's FLUX network has no LoRA "
             "on `final_layer` and creates T5 layers only from `lora_te3_` keys; diffusers' FLUX loader puts nothing on T5, "
             "and its kohya converter drops `img_in` / `txt_in` / `time_in` / `vector_in` / `guidance_in` / `final_layer` "
             "layers (it names them without the `transformer.` prefix); ComfyUI maps no diffusers-named T5 "
             "(`text_encoder_2.`) keys. A1111 has no FLUX loader. diffusers' kohya converter multiplies alpha / rank into "
             "the file's own bf16 factors: on the split_qkv file (scale 1/6) that alone costs 3e-3; the studio's diffusers "
             "export keeps such ups in float32 and is read exactly. diffusers refuses a raw peft `save_pretrained` file of "
             "the transformer (`base_model.model.*` keys: KeyError in its converter).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", choices=ARCHS, action="append", help="architectures (default: all)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "interop.md"))
    args = parser.parse_args()
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [row for arch in args.arch or ARCHS for row in rows_for(arch, Path(tmp))]
    text = markdown(rows, time.time() - start)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
