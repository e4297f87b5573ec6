"""Safe reading of a compressed collection file: caps and shapes checked, clear errors.

The header is parsed and checked by `studio.formats.safe.read_header` (size caps, byte ranges,
no pickle) before any tensor is read; then every expected key, dtype and shape is checked
against the ``studio.collection`` metadata, and the components must be orthonormal.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from studio.errors import FormatError
from studio.subspace.collection import FORMAT_TAG, FORMAT_VERSION, ORTHONORMAL_TOLERANCE, CompressedCollection, LayerShape
from studio.subspace.extract import LayerSubspace


def _body(path: Path, metadata: dict[str, str]) -> dict:
    if metadata.get("studio.format") != FORMAT_TAG:
        raise FormatError(f"{path}: not a compressed collection (studio.format is {metadata.get('studio.format')!r})")
    if metadata.get("studio.version") != FORMAT_VERSION:
        raise FormatError(f"{path}: collection format version {metadata.get('studio.version')!r}, this studio reads {FORMAT_VERSION}")
    try:
        body = json.loads(metadata["studio.collection"])
        if not isinstance(body.get("layers"), list) or not isinstance(body.get("adapters"), list):
            raise TypeError("layers and adapters must be lists")
    except (KeyError, json.JSONDecodeError, TypeError, AttributeError) as error:
        raise FormatError(f"{path}: invalid studio.collection metadata ({error})") from error
    return body


def _expect(path: Path, entries: dict, key: str, dtype: str, shape: list[int] | None, ndim: int) -> None:
    entry = entries.get(key)
    if entry is None:
        raise FormatError(f"{path}: tensor {key!r} is missing")
    if entry["dtype"] != dtype or len(entry["shape"]) != ndim or (shape is not None and entry["shape"] != shape):
        wanted = shape if shape is not None else f"{ndim}-D"
        raise FormatError(f"{path}: tensor {key!r} is {entry['dtype']} {entry['shape']}, expected {dtype} {wanted}")


def _check_layer(path: Path, entries: dict, i: int, layer: dict) -> tuple[str, LayerShape, int]:
    try:
        name, k = str(layer["name"]), int(layer["k"])
        shape = LayerShape(int(layer["in"]), int(layer["out"]), tuple(int(d) for d in layer["down_tail"]), tuple(int(d) for d in layer["up_tail"]))
    except (KeyError, TypeError, ValueError) as error:
        raise FormatError(f"{path}: layer {i} description is invalid ({error})") from error
    _expect(path, entries, f"layer.{i}.down_components", "F32", [k, shape.in_features], 2)
    _expect(path, entries, f"layer.{i}.up_components", "F32", [shape.out_features, k], 2)
    _expect(path, entries, f"layer.{i}.down_explained", "F32", None, 1)
    _expect(path, entries, f"layer.{i}.up_explained", "F32", None, 1)
    return name, shape, k


def _check_orthonormal(path: Path, name: str, down: torch.Tensor, up: torch.Tensor) -> None:
    for side, gram in (("down", down.double() @ down.double().T), ("up", up.double().T @ up.double())):
        deviation = (gram - torch.eye(gram.shape[0], dtype=gram.dtype)).abs()
        if not torch.isfinite(gram).all() or (deviation.numel() and float(deviation.max()) > ORTHONORMAL_TOLERANCE):
            raise FormatError(f"{path}: {side} components of layer {name!r} are not orthonormal (corrupt file?)")


def read_collection(path: Path) -> CompressedCollection:
    """Load the components and the adapter list of a collection; loadings stay on disk."""
    from safetensors import safe_open

    from studio.formats.safe import read_header

    entries, metadata = read_header(path)
    body = _body(path, metadata)
    expected_keys, layers, shapes = set(), {}, {}
    checked = [_check_layer(path, entries, i, layer) for i, layer in enumerate(body["layers"])]
    for j, summary in enumerate(body["adapters"]):
        if not isinstance(summary, dict) or not isinstance(summary.get("name"), str):
            raise FormatError(f"{path}: adapter {j} summary is invalid")
        _expect(path, entries, f"adapter.{j}.loadings", "F32", None, 1)
        _expect(path, entries, f"adapter.{j}.info", "U8", None, 1)
        expected_keys |= {f"adapter.{j}.loadings", f"adapter.{j}.info"}
    try:
        with safe_open(str(path), framework="pt") as handle:
            for i, (name, shape, k) in enumerate(checked):
                tensors = {part: handle.get_tensor(f"layer.{i}.{part}") for part in ("down_components", "up_components", "down_explained", "up_explained")}
                expected_keys |= {f"layer.{i}.{part}" for part in tensors}
                _check_orthonormal(path, name, tensors["down_components"], tensors["up_components"])
                layer = body["layers"][i]
                layers[name] = LayerSubspace(**tensors, requested_k=int(layer.get("requested_k", k)), principal_k=int(layer.get("principal_k", k)), augment=int(layer.get("augment", 0)))
                shapes[name] = shape
    except FormatError:
        raise
    except Exception as error:  # safetensors' own error types
        raise FormatError(f"{path}: could not read components ({error})") from error
    extra = set(entries) - expected_keys
    if extra:
        raise FormatError(f"{path}: unexpected tensors {sorted(extra)[:5]}")
    if len(layers) != len(checked):
        raise FormatError(f"{path}: a layer name appears twice")
    summaries = [{"name": s["name"], "sha256": str(s.get("sha256", "")), "rel_error": float(s.get("rel_error", 0.0))} for s in body["adapters"]]
    return CompressedCollection(layers, shapes, summaries, str(body.get("base_id", "")), body.get("spec") or {}, path)
