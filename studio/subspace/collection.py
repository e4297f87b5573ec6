"""The compressed collection file: shared per-layer components + per-adapter loadings.

One safetensors file (written atomically), keys by position so no module name needs escaping:
  layer.{i}.down_components (K, in) F32   layer.{i}.up_components (out, K) F32
  layer.{i}.down_explained, layer.{i}.up_explained  cumulative explained-energy curves (F32)
  adapter.{j}.loadings  every layer's alpha (r, K) then beta (K, r), flattened, in layer order
  adapter.{j}.info      UTF-8 JSON (U8): ranks / alphas per layer, original metadata, sha256
The header metadata ``studio.collection`` (JSON) holds the layer names and shapes, K per layer,
the adapter names, sha256 and errors, and the base model id. Per-adapter details live in
tensors so the header stays small for thousands of adapters. Reading is safe (no pickle,
capped header) and lazy: components at load, one adapter's loadings when asked.

This module is the one place that knows the layout: writing (`collection_metadata`, `save`) and
reading (`read_collection`: header caps and byte ranges by `studio.formats.safe.read_header`, then
every expected key, dtype and shape against the metadata, and orthonormal components).
"""

from __future__ import annotations

import math

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from studio.adapters.eigenlora import EigenLoraAdapter, EigenLoraLayer
from studio.adapters.lora import LoraAdapter, LoraLayer
from studio.errors import FormatError, StudioError
from studio.subspace.extract import LayerSubspace
from studio.subspace.spool import TensorSpool, write_spools

FORMAT_TAG = "studio.eigenlora-collection"
FORMAT_VERSION = "1"
ORTHONORMAL_TOLERANCE = 1e-3
RECONSTRUCTION_KEYS = ("studio.reconstructed_from", "studio.reconstruction_error", "studio.original_sha256")


@dataclass(frozen=True)
class LayerShape:
    """A layer's flattened sizes and the native tensor shapes of its LoRA factors (conv LoRAs
    keep (r, in, kh, kw) / (out, r, 1, 1)): ``down_tail`` = down.shape[1:], ``up_tail`` = up.shape[2:]."""

    in_features: int
    out_features: int
    down_tail: tuple[int, ...]
    up_tail: tuple[int, ...] = ()

    @classmethod
    def of(cls, layer: LoraLayer) -> "LayerShape":
        down_tail = tuple(layer.down.shape[1:])  # from shapes alone: indexing a tensor costs a view per layer
        return cls(math.prod(down_tail), int(layer.up.shape[0]), down_tail, tuple(layer.up.shape[2:]))

    def weight_shapes(self, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return (rank, *self.down_tail), (self.out_features, rank, *self.up_tail)


@dataclass
class AdapterRecord:
    """What the collection keeps of one adapter besides its loadings."""

    name: str
    sha256: str = ""
    rel_error: float = 0.0
    ranks: dict[str, int] = field(default_factory=dict)
    alphas: dict[str, float] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    source_format: str = ""
    base_arch: str = ""
    bytes_in: int = 0
    norm: float = 0.0  # ||dW||_F over all layers (canonical factors, scale folded in)

    def summary(self) -> dict:
        return {"name": self.name, "sha256": self.sha256, "rel_error": self.rel_error}


def pack_loadings(loadings: dict[str, tuple[Tensor, Tensor]], order: list[str]) -> Tensor:
    """Flatten alpha then beta of each layer, in collection layer ``order``, into one F32 vector."""
    parts = [t.detach().float().cpu().reshape(-1) for layer in order if layer in loadings for t in loadings[layer]]
    return torch.cat(parts) if parts else torch.zeros(0)


def unpack_loadings(flat: Tensor, ranks: dict[str, int], ks: dict[str, int], order: list[str], where: str) -> dict[str, tuple[Tensor, Tensor]]:
    """Inverse of `pack_loadings`; a size mismatch is a FormatError naming ``where``."""
    expected = sum(2 * ranks[layer] * ks[layer] for layer in order if layer in ranks)
    if flat.dim() != 1 or flat.numel() != expected:
        raise FormatError(f"{where}: loadings hold {flat.numel()} numbers, the ranks and K per layer need {expected}")
    loadings, offset = {}, 0
    for layer in order:
        if layer not in ranks:
            continue
        r, k = ranks[layer], ks[layer]
        alpha = flat[offset : offset + r * k].reshape(r, k)
        beta = flat[offset + r * k : offset + 2 * r * k].reshape(k, r)
        loadings[layer], offset = (alpha, beta), offset + 2 * r * k
    return loadings


def layer_tensors(index: int, subspace: LayerSubspace) -> dict[str, Tensor]:
    return {
        f"layer.{index}.down_components": subspace.down_components,
        f"layer.{index}.up_components": subspace.up_components,
        f"layer.{index}.down_explained": subspace.down_explained,
        f"layer.{index}.up_explained": subspace.up_explained,
    }


def info_tensor(record: AdapterRecord, order: list[str]) -> Tensor:
    """The record as UTF-8 JSON bytes; layers named by their index in ``order``."""
    position = {layer: i for i, layer in enumerate(order)}
    info = asdict(record)
    info["ranks"] = [[position[layer], rank] for layer, rank in record.ranks.items()]
    info["alphas"] = [[position[layer], alpha] for layer, alpha in record.alphas.items()]
    raw = json.dumps(info, sort_keys=True).encode("utf-8")
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.zeros(0, dtype=torch.uint8)


def record_from_info(raw: Tensor, order: list[str], where: str) -> AdapterRecord:
    try:
        info = json.loads(bytes(raw.numpy().tobytes()).decode("utf-8"))
        info["ranks"] = {order[int(i)]: int(r) for i, r in info["ranks"]}
        info["alphas"] = {order[int(i)]: float(a) for i, a in info["alphas"]}
        record = AdapterRecord(**info)
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError, IndexError) as error:
        raise FormatError(f"{where}: adapter info is not valid ({error})") from error
    if any(r < 1 for r in record.ranks.values()):
        raise FormatError(f"{where}: adapter info has a rank below 1")
    return record


def collection_metadata(
    base_id: str, spec: dict, layers: dict[str, LayerSubspace], shapes: dict[str, LayerShape], summaries: list[dict], report: dict | None = None
) -> dict[str, str]:
    """The header metadata: format tag, version and the ``studio.collection`` JSON (with the
    collection report's overall numbers and verdict when given)."""
    layer_list = [
        {
            "name": name, "in": shapes[name].in_features, "out": shapes[name].out_features,
            "down_tail": list(shapes[name].down_tail), "up_tail": list(shapes[name].up_tail),
            "k": sub.k, "principal_k": sub.principal_k, "requested_k": sub.requested_k, "augment": sub.augment,
        }
        for name, sub in layers.items()
    ]
    body = {"base_id": base_id, "spec": spec, "layers": layer_list, "adapters": summaries}
    if report:
        body["report"] = report
    return {"studio.format": FORMAT_TAG, "studio.version": FORMAT_VERSION, "studio.collection": json.dumps(body)}


class CompressedCollection:
    """Shared components and the stored adapters of a compressed collection.

    Read from a file by `load` (what `compress_events` returns), or built in memory by the test
    oracle (`studio.subspace.oracle`) and saved with `save`.
    """

    def __init__(
        self,
        layers: dict[str, LayerSubspace],
        shapes: dict[str, LayerShape],
        summaries: list[dict],
        base_id: str = "",
        spec: dict | None = None,
        path: Path | None = None,
        records: list[AdapterRecord] | None = None,
        loadings: list[Tensor] | None = None,
        report: dict | None = None,
    ) -> None:
        self.layers = layers
        self.shapes = shapes
        self.summaries = summaries
        self.base_id = base_id
        self.spec = dict(spec or {})
        self.path = path
        self._records = records
        self._loadings = loadings
        self.report = dict(report or {})  # overall numbers and verdict of the compress that wrote it
        self._order = list(layers)
        self._positions = {s["name"]: j for j, s in enumerate(summaries)}
        if len(self._positions) != len(summaries):
            raise StudioError(f"{self._where()}: adapter names must be unique")

    def _where(self) -> str:
        return str(self.path) if self.path else "compressed collection (in memory)"

    @property
    def names(self) -> list[str]:
        return [s["name"] for s in self.summaries]

    @property
    def ks(self) -> dict[str, int]:
        return {name: sub.k for name, sub in self.layers.items()}

    def components(self) -> dict[str, tuple[Tensor, Tensor]]:
        """``{layer: (down_components (K, in), up_components (out, K))}``."""
        return {name: (sub.down_components, sub.up_components) for name, sub in self.layers.items()}

    def _position(self, name: str) -> int:
        if name not in self._positions:
            raise KeyError(f"{self._where()} has no adapter {name!r}; it holds {self.names[:10]}")
        return self._positions[name]

    def record(self, name: str) -> AdapterRecord:
        j = self._position(name)
        if self._records is not None:
            return self._records[j]
        return record_from_info(self._read(f"adapter.{j}.info"), self._order, f"{self.path} adapter {name!r}")

    def loadings(self, name: str) -> dict[str, tuple[Tensor, Tensor]]:
        """``{layer: (alpha (r, K), beta (K, r))}`` of one stored adapter."""
        j = self._position(name)
        flat = self._loadings[j] if self._loadings is not None else self._read(f"adapter.{j}.loadings")
        record = self.record(name)
        unknown = set(record.ranks) - set(self.layers)
        if unknown:
            raise FormatError(f"{self._where()}: adapter {name!r} names layers the collection lacks: {sorted(unknown)[:3]}")
        return unpack_loadings(flat, record.ranks, self.ks, self._order, f"{self._where()} adapter {name!r}")

    def adapter(self, name: str) -> EigenLoraAdapter:
        """The stored adapter as an EigenLoRA module (components shared, loadings its own)."""
        record = self.record(name)
        layers = {
            layer: EigenLoraLayer(self.layers[layer].down_components, self.layers[layer].up_components, alpha, beta)
            for layer, (alpha, beta) in self.loadings(name).items()
        }
        shapes = {layer: self.shapes[layer].weight_shapes(record.ranks[layer]) for layer in layers}
        return EigenLoraAdapter(name, layers, record.metadata, shapes)

    def export(self, name: str) -> LoraAdapter:
        """The stored adapter as a plain LoRA (alpha = rank). The original metadata is carried over
        and tagged as a reconstruction (`RECONSTRUCTION_KEYS`: source collection, relative error,
        the original file's sha256), so that no tool takes it for the original file."""
        record = self.record(name)
        lora = self.adapter(name).to_lora()
        lora.base_arch = record.base_arch
        lora.metadata.update({
            "studio.reconstructed_from": Path(self.path).name if self.path else "compressed collection",
            "studio.reconstruction_error": f"{record.rel_error:.6g}",
            "studio.original_sha256": record.sha256,
        })
        lora.notes.append(f"reconstructed from {self._where()} (relative error {record.rel_error:.3e})")
        return lora

    def save(self, path: str | Path) -> Path:
        """Write an in-memory collection to one safetensors file (atomically)."""
        if self._records is None or self._loadings is None:
            raise StudioError(f"{self._where()} is read from a file; copy the file instead of saving it again")
        path = Path(path)
        spool = TensorSpool(path.parent / f".{path.name}.spool")
        try:
            for i, subspace in enumerate(self.layers.values()):
                for key, tensor in layer_tensors(i, subspace).items():
                    spool.add(key, tensor)
            for j, (record, flat) in enumerate(zip(self._records, self._loadings)):
                spool.add(f"adapter.{j}.loadings", flat)
                spool.add(f"adapter.{j}.info", info_tensor(record, self._order))
            spool.close()
            metadata = collection_metadata(self.base_id, self.spec, self.layers, self.shapes, self.summaries, self.report)
            return write_spools(path, [(spool.path, spool.entries, spool.size)], metadata)
        finally:
            spool.remove()

    def _read(self, key: str) -> Tensor:
        from safetensors import safe_open

        try:
            with safe_open(str(self.path), framework="pt") as handle:
                return handle.get_tensor(key)
        except Exception as error:  # safetensors raises its own error types
            raise FormatError(f"{self.path}: could not read tensor {key!r} ({error})") from error

    @classmethod
    def load(cls, path: str | Path) -> "CompressedCollection":
        """Read and check a collection file: header caps, format tag, every tensor's shape."""
        return read_collection(Path(path))


def export_from_collection(path: str | Path, name: str) -> LoraAdapter:
    """A stored adapter of a collection file as a plain LoRA (alpha = rank), for `studio export`."""
    return CompressedCollection.load(path).export(name)


# ---------------------------------------------------------------- reading


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
    report = body.get("report") if isinstance(body.get("report"), dict) else None
    return CompressedCollection(layers, shapes, summaries, str(body.get("base_id", "")), body.get("spec") or {}, path, report=report)


def is_collection_file(path: str | Path) -> bool:
    """Whether ``path`` is a compressed collection (its header says so); reads the header only.
    A file whose header cannot be read is not one (the LoRA reader then names its problem)."""
    from studio.formats.safe import read_header

    try:
        _, metadata = read_header(Path(path))
    except (StudioError, OSError):
        return False
    return metadata.get("studio.format") == FORMAT_TAG


def refuse_as_lora(path: Path, base=None, name: str | None = None) -> LoraAdapter:
    """What the LoRA reader says of a collection file: what it is and how to use one of its adapters."""
    if name:
        return export_from_collection(path, name)
    collection = CompressedCollection.load(path)
    names = [summary["name"] for summary in collection.summaries]
    shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
    raise FormatError(f"{path}: a compressed EigenLoRAx collection of {len(names)} adapters ({shown}), not one LoRA: "
                      f"name a member as {path}#NAME, or export it with `studio export {path} --adapter NAME`")
