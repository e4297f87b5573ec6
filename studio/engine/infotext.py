"""Generation parameters as PNG text, in the A1111 ``parameters`` style, and back.

    a red circle <lora:circle:0.8>
    Negative prompt: blurry
    Steps: 25, Sampler: DDIM, CFG scale: 4, Seed: 0, Size: 64x64, Model: world

Adapters are written as ``<lora:NAME:WEIGHT>`` tags after the prompt, as A1111 does, weights at
full precision (``repr`` of the float). Values that hold a comma, colon or quote are written
JSON-quoted (as A1111 does) so they read back intact.

A1111's own format is ambiguous (it does not escape): a prompt line starting with "Negative
prompt:", a literal ``<lora:...>`` tag inside the prompt, a name holding ``:`` or ``>``, or
surrounding whitespace cannot be told apart from the structure. When the plain text would not
read back exactly, the parameters line also carries ``Studio: {...}``, the exact parameters as
JSON, which ``parse_parameters`` prefers; A1111 shows it as one more field.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from dataclasses import fields as dataclass_fields
from pathlib import Path

from studio.errors import FormatError

PNG_KEY = "parameters"
LORA_TAG = re.compile(r"\s*<lora:([^:>]+):([^>]+)>")
FIELD = re.compile(r'\s*([\w][\w \-/+]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')
FIXED = ("Steps", "Sampler", "CFG scale", "Seed", "Size", "Model")
EXACT_FIELD = "Studio"


@dataclass
class ImageParameters:
    """Everything needed to make an image again."""

    prompt: str
    negative_prompt: str = ""
    steps: int = 25
    sampler: str = ""
    cfg_scale: float = 7.5
    seed: int = 0
    width: int = 512
    height: int = 512
    model: str = ""
    adapters: list[tuple[str, float]] = field(default_factory=list)
    extra: dict[str, str] = field(default_factory=dict)

    def to_text(self) -> str:
        """The A1111-style ``parameters`` text (plus the exact ``Studio`` field when it is ambiguous)."""
        plain = self._a1111_text()
        try:
            if EXACT_FIELD not in self.extra and _parse_plain(plain) == self:
                return plain
        except FormatError:
            pass
        exact = json.dumps(asdict(self), ensure_ascii=False, sort_keys=True)
        return f"{plain}, {EXACT_FIELD}: {json.dumps(exact, ensure_ascii=False)}"

    def _a1111_text(self) -> str:
        tags = "".join(f" <lora:{name}:{_number(weight)}>" for name, weight in self.adapters)
        lines = [self.prompt + tags]
        if self.negative_prompt:
            lines.append(f"Negative prompt: {self.negative_prompt}")
        values = {
            "Steps": str(self.steps), "Sampler": self.sampler, "CFG scale": _number(self.cfg_scale),
            "Seed": str(self.seed), "Size": f"{self.width}x{self.height}", "Model": self.model, **self.extra,
        }
        lines.append(", ".join(f"{key}: {_quoted(value)}" for key, value in values.items()))
        return "\n".join(lines)


def _number(value: float) -> str:
    """Full precision: an integral value as an integer, any other as Python's shortest exact repr."""
    value = float(value)
    return str(int(value)) if value.is_integer() and abs(value) < 2**53 else repr(value)


def _quoted(value: str) -> str:
    return json.dumps(value) if any(c in value for c in ',:"\n') else value


def _unquoted(value: str) -> str:
    value = value.strip()
    if not (value.startswith('"') and value.endswith('"') and len(value) > 1):
        return value
    try:
        return json.loads(value)
    except ValueError as error:
        raise FormatError(f"PNG parameters: quoted value {value[:40]!r} could not be read: {error}") from error


def parse_parameters(text: str) -> ImageParameters:
    """Read an A1111-style ``parameters`` text back (the inverse of ``to_text``).

    The exact ``Studio`` field wins when present; otherwise the text is read as A1111 writes it
    (every ``<lora:NAME:WEIGHT>`` tag in the prompt is an adapter).
    """
    _, fields = _split(text)
    if EXACT_FIELD in fields:
        return _from_exact(fields[EXACT_FIELD])
    return _parse_plain(text)


def _from_exact(raw: str) -> ImageParameters:
    try:
        fields = json.loads(raw)
        if not isinstance(fields, dict) or set(fields) != {f.name for f in dataclass_fields(ImageParameters)}:
            raise ValueError("not the parameters object")
        fields["adapters"] = [(str(name), float(weight)) for name, weight in fields["adapters"]]
        params = ImageParameters(**fields)
    except (ValueError, TypeError, RecursionError) as error:
        raise FormatError(f"PNG parameters: the {EXACT_FIELD!r} field could not be read: {error}") from error
    _check_types(params)
    return params


def _check_types(params: ImageParameters) -> None:
    kinds = {"prompt": str, "negative_prompt": str, "steps": int, "sampler": str, "cfg_scale": (int, float), "seed": int,
             "width": int, "height": int, "model": str, "extra": dict}
    for name, kind in kinds.items():
        value = getattr(params, name)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise FormatError(f"PNG parameters: {name} is {value!r}, expected {getattr(kind, '__name__', 'a number')}")
    params.cfg_scale = float(params.cfg_scale)


def _split(text: str) -> tuple[list[str], dict[str, str]]:
    """The prompt lines and the fields of the last ``Steps: ...`` line."""
    lines = text.rstrip("\n").split("\n")
    fields: dict[str, str] = {}
    if lines and re.match(r"\s*Steps:", lines[-1]):
        fields = {key.strip(): _unquoted(value) for key, value in FIELD.findall(lines.pop())}
    return lines, fields


def _parse_plain(text: str) -> ImageParameters:
    """The A1111 reading of a ``parameters`` text (the exact field, if any, is left in ``extra``)."""
    lines, fields = _split(text)
    negative_at = next((i for i, line in enumerate(lines) if line.startswith("Negative prompt:")), len(lines))
    prompt_text = "\n".join(lines[:negative_at])
    negative = "\n".join(lines[negative_at:])[len("Negative prompt:"):].strip() if negative_at < len(lines) else ""
    try:
        adapters = [(name, float(weight)) for name, weight in LORA_TAG.findall(prompt_text)]
        width, height = (int(v) for v in fields.get("Size", "512x512").split("x"))
        params = ImageParameters(
            prompt=LORA_TAG.sub("", prompt_text), negative_prompt=negative, steps=int(fields.get("Steps", 25)),
            sampler=fields.get("Sampler", ""), cfg_scale=float(fields.get("CFG scale", 7.5)), seed=int(fields.get("Seed", 0)),
            width=width, height=height, model=fields.get("Model", ""), adapters=adapters,
            extra={k: v for k, v in fields.items() if k not in FIXED},
        )
    except ValueError as error:
        raise FormatError(f"PNG parameters could not be read: {error}") from error
    return params


def save_png(image, parameters: ImageParameters, path: str | Path) -> Path:
    """Write a PNG (atomically) carrying its parameters as the ``parameters`` text chunk."""
    from PIL.PngImagePlugin import PngInfo

    from studio.fileio import atomic_path

    info = PngInfo()
    info.add_text(PNG_KEY, parameters.to_text())
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)
    return Path(path)


def read_png_parameters(path: str | Path) -> ImageParameters:
    """The parameters a PNG carries (FormatError if it carries none)."""
    from PIL import Image

    with Image.open(path) as image:
        text = image.text.get(PNG_KEY) if hasattr(image, "text") else None
    if text is None:
        raise FormatError(f"{path}: the image carries no '{PNG_KEY}' text")
    return parse_parameters(text)
