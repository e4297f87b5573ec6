"""``export_for``: write a LoRA in the layout a given tool reads exactly, and check that it does.

kohya sd-scripts, ComfyUI and A1111 read the kohya layout (``lora_unet_*`` with ``.alpha``; SDXL
in kohya's own SGM names); diffusers and peft read the diffusers layout (and the kohya one). The
written file is read back with each checked tool's key and scale rules (``consumers``) before it
is renamed into place: if the target tool would apply wrong values, nothing is written.

``LAYOUTS`` is keyed by base family: FLUX.1 has its own (kohya = BFL names with fused qkv /
linear1, read by kohya sd-scripts and ComfyUI; diffusers = diffusers names, read by diffusers);
A1111 has no FLUX loader, so ``--for a1111`` on a FLUX adapter is refused by name. A family
without an entry (SD3 today) is refused instead of guessed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from studio.adapters.lora import LoraAdapter
from studio.bases import ARCHITECTURES, ModuleTree, architecture_tree, module_tree
from studio.errors import StudioError
from studio.events import Message
from studio.fileio import atomic_path
from studio.formats.consumers import TOOL_LABELS, TOOLS, Fidelity, adapter_deltas, fidelity, read_as
from studio.formats.writer import layout_tensors

UNET_FAMILY = "unet"  # SD1.x, SD2.x, SDXL and the embedded world
LAYOUTS: dict[str, dict[str, str]] = {
    UNET_FAMILY: {"kohya": "kohya", "comfyui": "kohya", "a1111": "kohya", "diffusers": "diffusers"},
    "flux1": {"kohya": "kohya", "comfyui": "kohya", "diffusers": "diffusers"},  # kohya layout: ComfyUI also reads T5 there
}
NOT_READ = {"flux1": {"a1111": "A1111 has no FLUX.1 loader (its built-in Lora extension knows SD1 / SD2 / SDXL only): "
                                "export --for comfyui or --for kohya (the kohya layout), or --for diffusers"}}
READS = {  # who reads each layout, as benchmarks/interop.py measures it (docs/interop.md)
    UNET_FAMILY: {"kohya": ("the kohya layout is read by kohya sd-scripts, ComfyUI and A1111, and by diffusers (on SDXL without "
                            "text-encoder layers of a rank other than the most common one); the diffusers layout is for diffusers"),
                  "diffusers": ("the diffusers layout is for diffusers (ComfyUI reads part of it, kohya sd-scripts and A1111 none); "
                                "the kohya layout is for kohya sd-scripts, ComfyUI and A1111")},
    "flux1": {
        "kohya": ("the kohya layout (BFL names, fused qkv / linear1) is read by kohya sd-scripts (not final_layer: its network has no "
                  "LoRA there) and ComfyUI; diffusers reads it without T5 and without img_in / txt_in / time_in / vector_in / "
                  "guidance_in / final_layer (its kohya converter drops them); A1111 has no FLUX loader"),
        "diffusers": ("the diffusers layout is read by diffusers and ComfyUI, T5 layers excepted (diffusers' FLUX loader has none, "
                      "ComfyUI maps no text_encoder_2 keys); kohya sd-scripts reads none of it; A1111 has no FLUX loader"),
    },
}
EXACT = 1e-5  # relative dW error below which a tool's reading counts as exact (fp32 rounding)
FAITHFUL = 0.01  # above this a tool applies something else than the adapter: refused


@dataclass
class ToolExport:
    """What ``export_for`` wrote, how each checked tool reads it, and what the user should know."""

    path: Path
    tool: str
    layout: str
    checks: dict[str, Fidelity] = field(default_factory=dict)
    messages: list[Message] = field(default_factory=list)


def family_of(adapter: LoraAdapter) -> str:
    """The base family whose layouts apply: ``flux1`` / ``sd3`` for transformer adapters, else the UNet family."""
    from studio.formats.transformer_files import adapter_family

    return adapter_family(adapter) or UNET_FAMILY


def layout_for(tool: str, adapter: LoraAdapter) -> str:
    if tool not in TOOLS:
        raise StudioError(f"--for must be one of {', '.join(TOOLS)}, not {tool!r}")
    family = family_of(adapter)
    if family not in LAYOUTS:
        raise StudioError(f"no export layout is known for {tool} on a {family} base yet")
    if tool not in LAYOUTS[family]:
        raise StudioError(f"adapter {adapter.name!r}: {NOT_READ[family][tool]}")
    return LAYOUTS[family][tool]


def _tree_for(adapter: LoraAdapter, tree: ModuleTree | None) -> ModuleTree | None:
    if tree is not None:
        return tree
    if adapter.base_arch in ARCHITECTURES:
        return architecture_tree(adapter.base_arch)
    try:
        return module_tree(adapter.base_arch) if adapter.base_arch == "world" else None
    except StudioError:
        return None


def _check(tool: str, path: Path, tree: ModuleTree, expected: dict) -> Fidelity | None:
    """One tool's reading of the file; None when that tool's loader cannot be modelled on this tree."""
    try:
        return fidelity(read_as(tool, path, tree), expected)
    except ValueError:  # the diffusers loader is run on the real architectures only
        return None


def _messages(target: str, checks: dict[str, Fidelity | None], layout: str, family: str) -> list[Message]:
    messages = []
    for tool, result in checks.items():
        if result is None:
            messages.append(Message(f"{TOOL_LABELS[tool]}: not checked on this base", "info"))
            continue
        exact = result.refused is None and result.applied == result.expected and result.max_error <= EXACT
        level = "info" if exact or tool != target else "warning"
        messages.append(Message(result.summary(), level))
    messages.append(Message(f"written in the {layout} layout for {TOOL_LABELS[target]}; {READS[family][layout]}", "info"))
    return messages


def export_for(adapter: LoraAdapter, path: str | Path, tool: str, *, tree: ModuleTree | None = None,
               check: tuple[str, ...] | None = None, metadata: dict[str, str] | None = None) -> ToolExport:
    """Write ``adapter`` to ``path`` in the layout ``tool`` reads exactly, checked before the rename.

    ``check`` names the tools whose reading is verified (default: the target tool). The target
    tool applying any layer with a relative dW error above 1%, or refusing the file, is an error
    and nothing is written; layers it does not apply are a warning with the count.
    """
    layout = layout_for(tool, adapter)
    path = Path(path)
    tree = _tree_for(adapter, tree)
    tensors, header = layout_tensors(adapter, layout, metadata)
    expected = adapter_deltas(adapter)
    checks: dict[str, Fidelity | None] = {}
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=header)
        for name in check or (tool,):
            checks[name] = _check(name, tmp, tree, expected) if tree is not None else None
        target = checks.get(tool)
        if target is not None and (target.refused or target.max_error > FAITHFUL):
            raise StudioError(f"{path}: not written: {target.summary()}")
    result = ToolExport(path, tool, layout, {k: v for k, v in checks.items() if v is not None})
    result.messages = _messages(tool, checks, layout, family_of(adapter))
    return result
