"""peft LoraConfig fields a file carries: diffusers' ``lora_adapter_metadata`` header or peft's
adjacent ``adapter_config.json``; each layer's scale as peft computes it.

peft (``tuners/lora/model.py`` ``_create_and_replace`` and ``tuners/lora/layer.py``
``update_layer``): alpha = ``alpha_pattern`` entry matched by ``peft.utils.other.get_pattern_key``
(first pattern ``(.*\\.)?(pattern)$`` matching the module path) else ``lora_alpha``; scale =
alpha / sqrt(r) with ``use_rslora``, else alpha / r. The in-memory layer keeps scale = alpha / r,
so an rsLoRA layer is stored with alpha = lora_alpha * sqrt(r) (the same dW).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from studio.errors import FormatError, UnsupportedVariantError

PEFT_CONFIG_NAME = "adapter_config.json"
MAX_CONFIG_BYTES = 16 * 1024 * 1024


def _peft_default(name: str):
    from peft import LoraConfig

    return LoraConfig.__dataclass_fields__[name].default


@dataclass
class AdapterConfig:
    """The LoraConfig fields that decide a layer's scale (one per component)."""

    source: str
    lora_alpha: float
    use_rslora: bool = False
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    rank_pattern: dict[str, int] = field(default_factory=dict)
    r: int | None = None

    def alpha_for(self, module: str, rank: int) -> float:
        """The layer's alpha as stored in memory (scale = alpha / rank), by peft's own rules."""
        from peft.utils.other import get_pattern_key

        _, _, path = module.partition(".")
        names = [path] if path.startswith("text_model.") else [path, f"text_model.{path}"]
        alpha = self.lora_alpha
        for name in names:
            key = get_pattern_key(list(self.alpha_pattern), name)
            if key in self.alpha_pattern:
                alpha = self.alpha_pattern[key]
                break
        self._check_rank(module, names, rank)
        return alpha * math.sqrt(rank) if self.use_rslora else alpha

    def _check_rank(self, module: str, names: list[str], rank: int) -> None:
        from peft.utils.other import get_pattern_key

        declared = self.r
        for name in names:
            key = get_pattern_key(list(self.rank_pattern), name)
            if key in self.rank_pattern:
                declared = self.rank_pattern[key]
                break
        if declared is not None and declared != rank:
            raise FormatError(f"{self.source} declares rank {declared} for {module}, the tensors have rank {rank}")


def _number(source: str, name: str, value, integer: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or (integer and value != int(value)):
        raise FormatError(f"{source}: {name} must be a finite {'integer' if integer else 'number'}, not {value!r}")
    return int(value) if integer else float(value)


def _pattern(source: str, name: str, value, integer: bool) -> dict:
    if value in (None, {}):
        return {}
    if not isinstance(value, dict):
        raise FormatError(f"{source}: {name} must be an object of module pattern -> number, not {type(value).__name__}")
    return {str(k): _number(source, f"{name}[{k!r}]", v, integer) for k, v in value.items()}


def parse_config(source: str, fields: dict) -> AdapterConfig:
    """Check and keep the scale-deciding fields of one LoraConfig dict (peft's defaults fill gaps)."""
    if fields.get("use_dora"):
        raise UnsupportedVariantError(f"{source}: use_dora is set: DoRA (rescales W by a learned magnitude) is not imported")
    rslora = fields.get("use_rslora", _peft_default("use_rslora"))
    if not isinstance(rslora, bool):
        raise FormatError(f"{source}: use_rslora must be true or false, not {rslora!r}")
    r = fields.get("r")
    return AdapterConfig(
        source=source,
        lora_alpha=_number(source, "lora_alpha", fields.get("lora_alpha", _peft_default("lora_alpha"))),
        use_rslora=rslora,
        alpha_pattern=_pattern(source, "alpha_pattern", fields.get("alpha_pattern"), integer=False),
        rank_pattern=_pattern(source, "rank_pattern", fields.get("rank_pattern"), integer=True),
        r=None if r is None else int(_number(source, "r", r, integer=True)),
    )


def _diffusers_metadata(path: Path, raw: str) -> dict[str, AdapterConfig]:
    """diffusers' ``lora_adapter_metadata``: ``{"unet.r": 4, "unet.lora_alpha": 2, ...}`` per component."""
    source = f"{path}: lora_adapter_metadata"
    try:
        packed = json.loads(raw)
    except (json.JSONDecodeError, RecursionError) as error:
        raise FormatError(f"{source} is not valid JSON ({error}); the layers' scale cannot be known") from error
    if not isinstance(packed, dict):
        raise FormatError(f"{source} is not a JSON object; the layers' scale cannot be known")
    per_component: dict[str, dict] = {}
    for key, value in packed.items():
        component, dot, field_name = str(key).partition(".")
        if not dot:
            raise FormatError(f"{source}: key {key!r} names no component (expected e.g. 'unet.lora_alpha')")
        per_component.setdefault(component, {})[field_name] = value
    return {component: parse_config(f"{source} ({component})", fields) for component, fields in per_component.items()}


def _peft_config(path: Path) -> AdapterConfig | None:
    """peft's ``adapter_config.json`` next to ``adapter_model.safetensors``, when it is there."""
    config_path = path.with_name(PEFT_CONFIG_NAME)
    if not path.name.startswith("adapter_model") or not config_path.is_file():
        return None
    if config_path.stat().st_size > MAX_CONFIG_BYTES:
        raise FormatError(f"{config_path}: {config_path.stat().st_size} bytes, over the cap of {MAX_CONFIG_BYTES}")
    try:
        fields = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise FormatError(f"{config_path}: not valid JSON ({error}); the layers' scale cannot be known") from error
    if not isinstance(fields, dict):
        raise FormatError(f"{config_path}: not a JSON object")
    return parse_config(str(config_path), fields)


def component_configs(path: Path, fmt: str, metadata: dict[str, str]) -> tuple[dict[str, AdapterConfig], list[str]]:
    """The LoraConfig of each component a file's scale comes from, and notes saying where from."""
    if fmt == "kohya":
        return {}, []
    raw = metadata.get("lora_adapter_metadata")
    if raw:
        configs = _diffusers_metadata(path, raw)
        notes = ["scale from lora_adapter_metadata (use_rslora: alpha / sqrt(r))"] if any(c.use_rslora for c in configs.values()) else []
        return configs, notes
    config = _peft_config(path)
    if config is None:
        return {}, []
    notes = [f"scale from {PEFT_CONFIG_NAME}: lora_alpha {config.lora_alpha:g}"
             + (", rsLoRA (alpha / sqrt(r))" if config.use_rslora else "")
             + (f", {len(config.alpha_pattern)} alpha_pattern entries" if config.alpha_pattern else "")]
    return {component: config for component in ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")}, notes
