"""The engine: one live diffusers pipeline, adapters switched in and out of it, generation.

Merged path (one mix for the whole batch): ``W = W0 + sum_i w_i * s * dW_i`` is written into the
live weights in place (no wrapper modules, zero overhead at inference); switching rewrites only
the layers that differ, always from the pristine W0. Per-image path (one mix per image): the
weights stay pristine and forward hooks add each image's term (``studio.engine.batched``).

One re-entrant lock per engine serializes every switch-and-generate: the web app calls from
several threads, and a switch in the middle of another thread's denoising loop would mix weights.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from studio.adapters.base import Adapter
from studio.engine.batched import per_image_hooks
from studio.engine.infotext import ImageParameters
from studio.engine.live import LiveWeights, PreparedCache, merge_plan
from studio.engine.mix import Mix, MixTerm, label_of
from studio.engine.request import DtypeName, GeneratedImage, GenerateRequest
from studio.engine.schedulers import build_scheduler, label_of_scheduler
from studio.engine.specs import AdapterSpecError, check_name, display_name, existing_file, parse_spec
from studio.engine.updates import MergeFrom
from studio.errors import ConfigError

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
AdapterLike = Any  # Adapter | Mix | MixTerm | str (SPEC or registered name) | None | a sequence of these


@dataclass
class EngineConfig:
    """Where the pipeline runs and how adapters are kept there."""

    device: str | None = None  # None: cuda when available, else cpu
    dtype: DtypeName = "auto"  # auto: float16 on cuda, float32 on cpu
    cache_bytes: int = 4 << 30  # prepared adapter updates kept on the device (LRU)
    merge_from: MergeFrom = "auto"  # keep factors (auto: when smaller than dW) or dense dW

    def resolved_device(self) -> torch.device:
        return torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    def resolved_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.float16 if self.resolved_device().type == "cuda" else torch.float32
        return getattr(torch, self.dtype)


class Engine:
    """A pipeline with adapters switched in place; see the module docstring."""

    def __init__(self, pipe, base_label: str = "custom", config: EngineConfig | None = None):
        self.pipe = pipe
        self.base_label = base_label
        self.config = config or EngineConfig()
        self.lock = threading.RLock()
        components = {name: getattr(pipe, name) for name in COMPONENTS if getattr(pipe, name, None) is not None}
        self.live = LiveWeights(components)
        self.cache = PreparedCache(self.config.cache_bytes)
        self.active: Mix = Mix()
        self._original_scheduler = pipe.scheduler
        self._registry: dict[str, Adapter] = {}
        self._files: dict[tuple, Any] = {}
        self._tree = None

    @classmethod
    def load(cls, base: str, config: EngineConfig | None = None) -> "Engine":
        """Load BASE (world, folder, single file, hub id) on the configured device and dtype."""
        from studio.bases import load_pipeline

        config = config or EngineConfig()
        pipe = load_pipeline(base, dtype=config.resolved_dtype(), device=config.resolved_device())
        label = base if base == "world" else display_name(Path(base).name)
        return cls(pipe, label, config)

    # -- adapters by name -------------------------------------------------------------------

    def register(self, name: str, adapter: Adapter) -> str:
        """Make an adapter reachable by ``name`` (names that look like paths are refused)."""
        check_name(name)
        with self.lock:
            old = self._registry.get(name)
            if old is not None and old is not adapter:
                self.cache.forget(old)
            self._registry[name] = adapter
        return name

    def unregister(self, name: str) -> None:
        with self.lock:
            adapter = self._registry.pop(name, None)
            if adapter is not None:
                self.cache.forget(adapter)

    def names(self) -> list[str]:
        return sorted(self._registry)

    def forget(self, adapter: Adapter) -> None:
        """Drop an adapter's prepared updates (after its parameters changed, e.g. in training)."""
        with self.lock:
            self.cache.forget(adapter)

    @property
    def tree(self):
        """The live pipeline's module tree (for placing LoRA file keys)."""
        if self._tree is None:
            from studio.bases import pipeline_tree

            self._tree = pipeline_tree(self.pipe, self.base_label)
        return self._tree

    # -- resolving what to apply --------------------------------------------------------------

    def mix(self, adapters: AdapterLike) -> Mix:
        """Normalise an adapter, a SPEC, a registered name, a Mix or a list of them to one Mix."""
        if adapters is None:
            return Mix()
        if isinstance(adapters, Mix):
            return adapters
        if isinstance(adapters, MixTerm):
            return Mix((adapters,))
        if isinstance(adapters, str):
            return self._mix_of_spec(adapters)
        if isinstance(adapters, tuple) and len(adapters) == 2 and isinstance(adapters[1], (int, float)) and not isinstance(adapters[1], bool):
            return self.mix(adapters[0]).scaled(float(adapters[1]))
        if isinstance(adapters, (list, tuple)):
            return Mix(tuple(term for item in adapters for term in self.mix(item).terms))
        if hasattr(adapters, "layers") and hasattr(adapters, "delta"):
            return Mix((MixTerm(adapters, 1.0, self._label(adapters)),))
        raise ConfigError(f"cannot apply {type(adapters).__name__}: expected an adapter, a SPEC string or a Mix")

    def _label(self, adapter: Adapter) -> str:
        for name, registered in self._registry.items():
            if registered is adapter:
                return name
        return display_name(label_of(adapter))

    def _mix_of_spec(self, text: str) -> Mix:
        spec = parse_spec(text)
        if spec.is_none:
            return Mix()
        if spec.member is None and spec.target in self._registry:
            return Mix((MixTerm(self._registry[spec.target], spec.weight, spec.target),))
        path = existing_file(spec)
        if spec.member is None:
            adapter, label = self._load_file(path), display_name(path.stem)
        else:
            adapter, label = self._collection(path).adapter(spec.member), display_name(spec.member)
        return Mix((MixTerm(adapter, spec.weight, label),))

    def _file_key(self, path: Path, kind: str) -> tuple:
        stat = path.stat()
        return (kind, str(path.resolve()), stat.st_mtime_ns, stat.st_size)

    def _load_file(self, path: Path) -> Adapter:
        """A LoRA file read once per (path, mtime, size), placed on this pipeline's modules."""
        key = self._file_key(path, "file")
        if key not in self._files:
            from studio.formats import load_adapter

            self._files[key] = load_adapter(path, self.tree, name=display_name(path.stem))
        return self._files[key]

    def _collection(self, path: Path):
        """A compressed collection read once, so all its adapters share one basis in memory."""
        key = self._file_key(path, "collection")
        if key not in self._files:
            try:
                from studio.subspace.collection import CompressedCollection
            except ImportError as error:
                raise AdapterSpecError(f"{path}: compressed collections need studio.subspace.collection ({error})") from error
            self._files[key] = CompressedCollection.load(path)
        return self._files[key]

    # -- merged path --------------------------------------------------------------------------

    def activate(self, adapters: AdapterLike, scale: float = 1.0) -> Mix:
        """Merge a mix into the live weights (switching from whatever is merged now)."""
        with self.lock:
            mix = self.mix(adapters).scaled(scale)
            prepared = [self.cache.get(t.adapter, self.live, self.config.merge_from, t.label) for t in mix.terms]
            self.live.write(merge_plan(mix, prepared))
            self.active = mix
            return mix

    def restore(self) -> None:
        """Put every pristine weight back."""
        with self.lock:
            self.live.restore()
            self.active = Mix()

    @contextlib.contextmanager
    def applied(self, adapters: AdapterLike, scale: float = 1.0) -> Iterator["Engine"]:
        """``with engine.applied(a, 0.8): ...`` holds the lock, merges, restores W0 in finally."""
        with self.lock:
            try:
                self.activate(adapters, scale)
                yield self
            finally:
                self.restore()

    # -- per-image path -----------------------------------------------------------------------

    @contextlib.contextmanager
    def per_image(self, assignments: Sequence[AdapterLike]) -> Iterator[list[Mix]]:
        """Pristine weights plus hooks giving image i (rows i, n+i, ...) its own mix."""
        with self.lock:
            mixes = [self.mix(item) for item in assignments]
            self.restore()
            with per_image_hooks(self.live.modules, [m if m else None for m in mixes]):
                yield mixes

    # -- generation ---------------------------------------------------------------------------

    def generate(self, request: GenerateRequest) -> list[GeneratedImage]:
        """Images for a request (``request.base`` is ignored: this engine's pipeline is used)."""
        _check_request(request)
        with self.lock:
            if request.per_image:
                return self.generate_per_image(request, request.adapters, [request.seed + i for i in range(len(request.adapters))])
            mix = self.activate(request.adapters, request.scale)
            seeds = [request.seed + i for i in range(request.batch)]
            return self._images(request, self._run(request, seeds), seeds, [mix] * len(seeds))

    def generate_per_image(self, request: GenerateRequest, assignments: Sequence[AdapterLike], seeds: Sequence[int]) -> list[GeneratedImage]:
        """One batch, image i with ``assignments[i]`` (scaled by ``request.scale``) and ``seeds[i]``."""
        if len(seeds) != len(assignments):
            raise ConfigError(f"{len(assignments)} adapters but {len(seeds)} seeds")
        with self.lock:
            scaled = [self.mix(item).scaled(request.scale) for item in assignments]
            with self.per_image(scaled) as mixes:
                pixels = self._run(request, list(seeds))
            return self._images(request, pixels, list(seeds), mixes)

    def _size(self, request: GenerateRequest) -> tuple[int, int]:
        native = int(self.pipe.unet.config.sample_size) * int(self.pipe.vae_scale_factor)
        return int(request.width or native), int(request.height or native)

    def _run(self, request: GenerateRequest, seeds: list[int]):
        """Call the pipeline once for ``len(seeds)`` images; returns float pixels (n, H, W, 3)."""
        width, height = self._size(request)
        n = len(seeds)
        self.pipe.scheduler = build_scheduler(request.scheduler, self._original_scheduler)
        generators = [torch.Generator("cpu").manual_seed(int(seed)) for seed in seeds]
        output = self.pipe(
            prompt=[request.prompt] * n,
            negative_prompt=[request.negative_prompt] * n if request.negative_prompt else None,
            num_inference_steps=request.steps, guidance_scale=request.guidance_for(self.base_label),
            width=width, height=height, generator=generators, output_type="np",
        )
        return output.images

    def _images(self, request: GenerateRequest, pixels, seeds: list[int], mixes: Sequence[Mix]) -> list[GeneratedImage]:
        from PIL import Image

        width, height = self._size(request)
        sampler = label_of_scheduler(request.scheduler, self._original_scheduler)
        images = []
        for array, seed, mix in zip(pixels, seeds, mixes):
            params = ImageParameters(
                prompt=request.prompt, negative_prompt=request.negative_prompt, steps=request.steps, sampler=sampler,
                cfg_scale=request.guidance_for(self.base_label), seed=seed, width=width, height=height,
                model=self.base_label, adapters=mix.labels,
            )
            image = Image.fromarray((array * 255).round().clip(0, 255).astype("uint8"))
            images.append(GeneratedImage(image, params, array))
        return images


def _check_request(request: GenerateRequest) -> None:
    if request.steps < 1:
        raise ConfigError(f"steps must be at least 1, got {request.steps}")
    if request.batch < 1:
        raise ConfigError(f"batch must be at least 1, got {request.batch}")
    if request.per_image and not request.adapters:
        raise ConfigError("per-image generation needs one adapter per image (use 'none' for no adapter)")
    if request.per_image and request.batch not in (1, len(request.adapters)):
        raise ConfigError(f"per-image batch of {request.batch} but {len(request.adapters)} adapters given")
    for side in (request.width, request.height):
        if side is not None and (side < 8 or side % 8):
            raise ConfigError(f"width and height must be multiples of 8, got {side}")
