"""The engine: one live diffusers pipeline, adapters switched in and out of it, generation.

Merged path (one mix for the whole batch): ``W = W0 + sum_i w_i * s * dW_i`` is written into the
live weights in place (no wrapper modules, zero overhead at inference) by
``studio.engine.patch.MergedWeights``: always from the pristine W0, one batched kernel per group
of equal-shape layers, checked finite before it goes live. Per-image path (one mix per image):
the weights stay pristine and forward hooks add each image's term (``studio.engine.batched``).

One re-entrant lock per engine serializes every switch-and-generate: the web app calls from
several threads, and a switch in the middle of another thread's denoising loop would mix weights.
Resolving names and files uses a second, short lock, so callers can resolve while a batch runs.
``studio.engine.batcher.Batcher`` gathers concurrent requests into one per-image batch.

Every base the studio knows works alike (``studio.bases.base_of(pipe)``): the components that
take adapters are the base's ``adapter_components`` (SD: unet + CLIP; SDXL: unet + both CLIPs;
FLUX.1: transformer + CLIP + T5; SD3: transformer + three encoders), the default size is the
base's native resolution. FLUX.1 has no CFG batch: ``guidance`` is the embedded (distilled)
guidance of FLUX.1-dev (written to PNG info as Forge does: ``CFG scale: 1, Distilled CFG
Scale: g``), FLUX.1-schnell has none, and a negative prompt is refused (nothing would read it).
SD, SDXL and SD3 run CFG as ``[uncond; cond]``, so the per-image hooks give row b image b % n.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from studio.adapters.base import Adapter, AdapterBase
from studio.bases.conditioning import native_resolution
from studio.bases.family import base_of
from studio.engine.batched import per_image_hooks
from studio.engine.infotext import ImageParameters
from studio.engine.live import NonFiniteUpdateError, PreparedCache, merge_plan, targetable_modules
from studio.engine.mix import Mix, MixTerm, label_of
from studio.engine.patch import MergedWeights, MergeFrom, NonFiniteMerge, culprit
from studio.engine.request import DtypeName, GeneratedImage, GenerateRequest
from studio.engine.schedulers import build_scheduler, label_of_scheduler
from studio.engine.specs import check_name, display_name, existing_file, parse_spec
from studio.errors import ConfigError

MAX_SEED = 2**63 - 1
BF16_FAMILIES = ("flux1", "sd3")  # trained in bf16; their activations overflow float16  # torch.Generator.manual_seed takes signed 64-bit seeds
AdapterLike = Any  # Adapter | Mix | MixTerm | str (SPEC or registered name) | None | a sequence of these
StepHook = Callable[[int, int], bool]  # (steps done, total) -> True to interrupt the denoising loop


@dataclass
class EngineConfig:
    """Where the pipeline runs and how adapters are kept there."""

    device: str | None = field(default=None, metadata={"help": "torch device; None: cuda when available, else cpu"})
    dtype: DtypeName = field(default="auto", metadata={
        "help": "weight dtype; auto: float32 on cpu; on cuda bfloat16 for FLUX.1 / SD3 (fp16 overflows there), float16 otherwise"})
    cache_bytes: int = field(default=4 << 30, metadata={"help": "bytes of prepared adapter updates kept on the device (LRU)"})
    merge_from: MergeFrom = field(default="auto", metadata={
        "help": "keep LoRA factors (auto: when at most half the size of dW) or dense dW for merging"})
    check_finite: bool = field(default=True, metadata={
        "help": "check merged weights are finite before they go live (one fp32 sum per weight group)"})

    def resolved_device(self) -> torch.device:
        return torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    def resolved_dtype(self, family: str = "") -> torch.dtype:
        """The weight dtype for a base family (``studio.bases.Base.id``; "" when not known yet)."""
        if self.dtype == "auto":
            if self.resolved_device().type != "cuda":
                return torch.float32
            return torch.bfloat16 if family in BF16_FAMILIES and torch.cuda.is_bf16_supported() else torch.float16
        return getattr(torch, self.dtype)


@dataclass(frozen=True)
class ImageJob:
    """One image of a batch: its prompt, negative prompt, seed and mix."""

    prompt: str
    negative_prompt: str
    seed: int
    mix: Mix


class Engine:
    """A pipeline with adapters switched in place; see the module docstring."""

    def __init__(self, pipe, base_label: str = "custom", config: EngineConfig | None = None):
        self.pipe = pipe
        self.base_label = base_label
        self.config = config or EngineConfig()
        self.lock = threading.RLock()
        self._catalog = threading.RLock()  # guards _registry and _files; never held while taking self.lock
        self.base = base_of(pipe)
        self.guidance_mode = self.base.guidance_for(dict(getattr(pipe, self.base.denoiser).config))
        components = {name: getattr(pipe, name) for name in self.base.adapter_components if isinstance(getattr(pipe, name, None), torch.nn.Module)}
        self.live = MergedWeights(targetable_modules(components))
        self.cache = PreparedCache(self.config.cache_bytes)
        self.active: Mix = Mix()
        self._original_scheduler = pipe.scheduler
        self._registry: dict[str, Adapter] = {}
        self._files: dict[tuple, Any] = {}
        self._tree = None
        self._batcher = None
        self._cost = None  # studio.engine.estimate.CostModel, built by the first estimate
        self._flops_per_second: float | None = None  # measured on generations after that

    @classmethod
    def load(cls, base: str, config: EngineConfig | None = None) -> "Engine":
        """Load BASE (world, folder, single file, hub id) on the configured device and dtype."""
        from studio.bases import load_pipeline

        config = config or EngineConfig()
        pipe = load_pipeline(base, dtype=config.resolved_dtype(_family_of(base)), device=config.resolved_device())
        label = base if base == "world" else display_name(Path(base).name)
        return cls(pipe, label, config)

    # -- adapters by name -------------------------------------------------------------------

    def register(self, name: str, adapter: Adapter) -> str:
        """Make an adapter reachable by ``name`` (names that look like paths are refused)."""
        check_name(name)
        with self._catalog:
            old = self._registry.get(name)
            self._registry[name] = adapter
        if old is not None and old is not adapter:
            self.forget(old)
        return name

    def unregister(self, name: str) -> None:
        with self._catalog:
            adapter = self._registry.pop(name, None)
        if adapter is not None:
            self.forget(adapter)

    def names(self) -> list[str]:
        with self._catalog:
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
            with self._catalog:
                return self._mix_of_spec(adapters)
        if isinstance(adapters, tuple) and len(adapters) == 2 and isinstance(adapters[1], (int, float)) and not isinstance(adapters[1], bool):
            return self.mix(adapters[0]).scaled(float(adapters[1]))
        if isinstance(adapters, (list, tuple)):
            return Mix(tuple(term for item in adapters for term in self.mix(item).terms))
        if isinstance(adapters, (AdapterBase, Adapter)):
            return Mix((MixTerm(adapters, 1.0, self._label(adapters)),))
        raise ConfigError(f"cannot apply {type(adapters).__name__}: expected an adapter, a SPEC string or a Mix")

    def _label(self, adapter: Adapter) -> str:
        with self._catalog:
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
            from studio.subspace.collection import CompressedCollection

            self._files[key] = CompressedCollection.load(path)
        return self._files[key]

    # -- merged path --------------------------------------------------------------------------

    def activate(self, adapters: AdapterLike, scale: float = 1.0) -> Mix:
        """Merge a mix into the live weights (switching from whatever is merged now).

        Refuses non-finite weights up front and a merge whose weights are not finite
        (``NonFiniteUpdateError``, naming the adapter, its weight and the layer; W0 stays live).
        """
        check_finite_number("scale", scale)
        with self.lock:
            mix = self.mix(adapters).scaled(scale)
            check_mix(mix)
            if not self.live.intact():  # weights moved or replaced behind our back: start over
                self.live.release()
                self.cache.clear()
            prepared = [self.cache.get(t.adapter, self.live, self.config.merge_from, t.label) for t in mix.terms]
            try:
                self.live.write(merge_plan(mix, prepared), check_finite=self.config.check_finite)
            except NonFiniteMerge as failure:
                self.active = Mix()
                raise self._merge_error(failure) from None
            self.active = mix
            return mix

    def _merge_error(self, failure: NonFiniteMerge) -> NonFiniteUpdateError:
        group, terms = failure.groups[0]
        label, weight, layer = culprit(group, terms)
        at = f" at weight {weight:g}" if math.isfinite(weight) else ""
        return NonFiniteUpdateError(
            f"merging adapter {label!r}{at} makes layer {layer} non-finite in {group.dtype} (beyond the dtype's range); "
            "the pristine weights were kept: lower the adapter's weight or check its alpha"
        )

    def restore(self) -> None:
        """Put every pristine weight back."""
        with self.lock:
            self.live.restore()
            self.active = Mix()

    def release(self) -> None:
        """Pristine weights back, each module with its own weight storage (before saving or moving
        the pipeline); prepared updates are dropped. The engine stays usable."""
        with self.lock:
            self.live.release()
            self.cache.clear()
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
            for mix in mixes:
                check_mix(mix)
            self.restore()
            prepared = lambda term: self.cache.get(term.adapter, self.live, self.config.merge_from, term.label)  # noqa: E731
            with per_image_hooks(self.live.modules, [m if m else None for m in mixes], prepared):
                yield mixes

    # -- serving ------------------------------------------------------------------------------

    def submit(self, request: GenerateRequest, stop: threading.Event | None = None,
               on_step: Callable[[int, int], None] | None = None) -> "Future[list[GeneratedImage]]":
        """Queue a request on this engine's batcher (``studio.engine.batcher``, started on first use):
        concurrent requests are gathered into per-image batches; the future holds this request's
        own images. Bad requests raise here, before anything is queued. ``stop`` set ends this
        request at the next denoising step (its future raises `studio.errors.Interrupted`);
        ``on_step(done, total)`` follows its batch's denoising steps."""
        return self.batcher().submit(request, stop, on_step)

    def batcher(self, config=None):
        """This engine's request batcher, started on first use (``config``: a
        `studio.engine.batcher.BatcherConfig` for the first call; later calls return the running one)."""
        from studio.engine.batcher import Batcher

        with self._catalog:
            if self._batcher is None:
                self._batcher = Batcher(self, config)
            return self._batcher

    def close(self) -> None:
        """Stop this engine's batcher after what it has queued (the engine stays usable)."""
        with self._catalog:
            batcher, self._batcher = self._batcher, None
        if batcher is not None:
            batcher.close()

    # -- generation ---------------------------------------------------------------------------

    def generate(self, request: GenerateRequest, on_step: StepHook | None = None) -> list[GeneratedImage]:
        """Images for a request (``request.base`` is ignored: this engine's pipeline is used);
        ``on_step`` as in `run_jobs`."""
        jobs = self.jobs(request)
        images = self.run_jobs(request, jobs, on_step)
        raise_first_failure(images)
        return images

    def jobs(self, request: GenerateRequest) -> list[ImageJob]:
        """The request's images, each with its prompt, seed and resolved mix (checked up front)."""
        check_request(request)
        self.check_negative(request.negative_prompt)
        if request.per_image:
            mixes = [self.mix(item).scaled(request.scale) for item in request.adapters]
        else:
            mixes = [self.mix(request.adapters).scaled(request.scale)] * request.batch
        for mix in mixes:
            check_mix(mix)
        return [ImageJob(request.prompt, request.negative_prompt, request.seed + i, mix) for i, mix in enumerate(mixes)]

    def generate_per_image(self, request: GenerateRequest, assignments: Sequence[AdapterLike], seeds: Sequence[int],
                           on_step: StepHook | None = None) -> list[GeneratedImage]:
        """One batch, image i with ``assignments[i]`` (scaled by ``request.scale``) and ``seeds[i]``."""
        if len(seeds) != len(assignments):
            raise ConfigError(f"{len(assignments)} adapters but {len(seeds)} seeds")
        check_request(request)
        self.check_negative(request.negative_prompt)
        jobs = [ImageJob(request.prompt, request.negative_prompt, int(seed), self.mix(item).scaled(request.scale))
                for item, seed in zip(assignments, seeds)]
        images = self.run_jobs(request, jobs, on_step)
        raise_first_failure(images)
        return images

    def run_jobs(self, settings: GenerateRequest, jobs: Sequence[ImageJob],
                 on_step: StepHook | None = None) -> list[GeneratedImage | NonFiniteUpdateError]:
        """One pipeline call for ``jobs`` with the shared settings (steps, size, scheduler, guidance).

        All jobs with one mix: merged path; otherwise per-image hooks. An image whose pixels are
        not finite comes back as a ``NonFiniteUpdateError`` in its place (the others are good).
        ``on_step(done, total)`` is called after every denoising step; when it returns True the
        pipeline's loop is interrupted (diffusers' ``callback_on_step_end`` setting ``_interrupt``:
        the remaining steps are skipped and the latents decoded as they are) and the caller, who
        asked for it, discards the images.
        """
        for job in jobs:
            check_mix(job.mix)
            self.check_negative(job.negative_prompt)
        with self.lock:
            started = time.perf_counter()
            if all(same_mix(job.mix, jobs[0].mix) for job in jobs):
                self.activate(jobs[0].mix)
                pixels = self._run(settings, jobs, on_step)
            else:
                with self.per_image([job.mix for job in jobs]):
                    pixels = self._run(settings, jobs, on_step)
            self._observe(settings, len(jobs), time.perf_counter() - started)
            return self._images(settings, pixels, jobs)

    def estimate(self, request: GenerateRequest, fused_attention: bool = True):
        """Memory, compute and time of a request, before anything is allocated (``studio.engine.estimate``).

        The first call probes the pipeline's UNet and VAE on the meta device (about a second for
        SD1.5, a few for SDXL); later calls are arithmetic.
        """
        from studio.engine import estimate

        check_request(request)
        with self._catalog:
            if self._cost is None:
                self._cost = estimate.cost_model(self.pipe, self.config.resolved_dtype(self.base.id))
            cost, measured = self._cost, self._flops_per_second
        width, height = self.size_of(request)
        images = len(request.adapters) if request.per_image else request.batch
        rate = measured or estimate.default_throughput(self.config.resolved_device())
        return estimate.estimate_request(cost, (width, height), images, request.steps, self.guidance_of(request),
                                         (rate, measured is not None), fused_attention)

    def _observe(self, settings: GenerateRequest, images: int, seconds: float) -> None:
        """Learn this device's throughput from a finished call (only once estimates are in use)."""
        if self._cost is None or seconds <= 0:
            return
        from dataclasses import replace

        flops = self.estimate(replace(settings, per_image=False, batch=images)).tflop * 1e12
        rate = flops / seconds
        self._flops_per_second = rate if self._flops_per_second is None else 0.7 * self._flops_per_second + 0.3 * rate

    def size_of(self, request: GenerateRequest) -> tuple[int, int]:
        """(width, height) in pixels of the request's images (the base's native size by default)."""
        native = native_resolution(self.pipe)
        return int(request.width or native), int(request.height or native)

    def guidance_of(self, request: GenerateRequest) -> float:
        """The request's guidance on this base: CFG scale, or FLUX.1-dev's embedded guidance (see the module docstring)."""
        return request.guidance_for(self.base_label, self.base.id, self.guidance_mode)

    def check_negative(self, negative_prompt: str) -> None:
        """Refuse a negative prompt on a base without a CFG batch (FLUX.1: nothing would read it)."""
        if negative_prompt and self.base.guidance != "cfg":
            raise ConfigError(f"negative prompt: {self.base.label} has no classifier-free guidance batch (it is guided by "
                              "an embedded guidance scale), so a negative prompt would have no effect; leave it empty")

    def _cfg_fields(self, guidance: float) -> tuple[float, dict[str, str]]:
        """(CFG scale, extra PNG fields): FLUX.1-dev writes its guidance as Forge does."""
        if self.guidance_mode == "embedded":
            return 1.0, {"Distilled CFG Scale": _number(guidance)}
        if self.guidance_mode == "none":
            return 1.0, {}
        return guidance, {}

    def _run(self, request: GenerateRequest, jobs: Sequence[ImageJob], on_step: StepHook | None = None):
        """Call the pipeline once for the jobs; returns float pixels (n, H, W, 3)."""
        width, height = self.size_of(request)
        self.pipe.scheduler = build_scheduler(request.scheduler, self._original_scheduler, self.base.target == "flow")
        generators = [torch.Generator("cpu").manual_seed(int(job.seed)) for job in jobs]
        negatives = [job.negative_prompt for job in jobs]
        output = self.pipe(
            prompt=[job.prompt for job in jobs], negative_prompt=negatives if any(negatives) else None,
            num_inference_steps=request.steps, guidance_scale=self.guidance_of(request),
            width=width, height=height, generator=generators, output_type="np",
            **({"callback_on_step_end": _step_callback(on_step, request.steps)} if on_step is not None else {}),
        )
        return output.images

    def _images(self, request: GenerateRequest, pixels, jobs: Sequence[ImageJob]) -> list[GeneratedImage | NonFiniteUpdateError]:
        from PIL import Image

        width, height = self.size_of(request)
        sampler = label_of_scheduler(request.scheduler, self._original_scheduler, self.base.target == "flow")
        cfg_scale, extra = self._cfg_fields(self.guidance_of(request))
        images: list[GeneratedImage | NonFiniteUpdateError] = []
        for array, job in zip(pixels, jobs):
            if not np.isfinite(array).all():
                images.append(_non_finite_image(job))
                continue
            params = ImageParameters(
                prompt=job.prompt, negative_prompt=job.negative_prompt, steps=request.steps, sampler=sampler,
                cfg_scale=cfg_scale, seed=job.seed, width=width, height=height,
                model=self.base_label, adapters=job.mix.labels, extra=dict(extra),
            )
            image = Image.fromarray((array * 255).round().clip(0, 255).astype("uint8"))
            images.append(GeneratedImage(image, params, array))
        return images


def _step_callback(on_step: StepHook, total: int):
    """A diffusers ``callback_on_step_end`` calling ``on_step`` and interrupting the loop when it says so."""
    def callback(pipe, index: int, timestep, tensors: dict) -> dict:
        if on_step(index + 1, total):
            pipe._interrupt = True
        return tensors
    return callback


def _non_finite_image(job: ImageJob) -> NonFiniteUpdateError:
    used = ", ".join(f"{label!r} at weight {weight:g}" for label, weight in job.mix.labels) or "no adapter"
    return NonFiniteUpdateError(
        f"the image for seed {job.seed} came out non-finite (NaN/inf pixels, which would save as a black PNG) with {used}; "
        "lower the adapter weight or check the adapter's alpha"
    )


def _family_of(base: str) -> str:
    """The base family of a BASE before loading it (from its module tree; "" for hub ids or when unknown)."""
    from studio.bases import is_hub_id, module_tree
    from studio.errors import StudioError

    if is_hub_id(base):
        return ""
    try:
        return module_tree(base).family
    except StudioError:
        return ""


def _number(value: float) -> str:
    value = float(value)
    return str(int(value)) if value.is_integer() and abs(value) < 2**53 else repr(value)


def raise_first_failure(images: Sequence[GeneratedImage | Exception]) -> None:
    for image in images:
        if isinstance(image, Exception):
            raise image


def same_mix(a: Mix, b: Mix) -> bool:
    """True when two mixes apply the same adapters (by identity) at the same weights."""
    if a is b:
        return True
    return [(id(t.adapter), t.weight) for t in a.terms] == [(id(t.adapter), t.weight) for t in b.terms]


def check_finite_number(name: str, value: float | None) -> None:
    """Refuse NaN / inf (and non-numbers) for a numeric setting, naming it."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")


def check_mix(mix: Mix) -> None:
    """Refuse a mix with a NaN / inf adapter weight, naming the adapter."""
    for term in mix.terms:
        if not math.isfinite(term.weight):
            raise ConfigError(f"adapter {term.label or label_of(term.adapter)!r}: weight must be a finite number, got {term.weight!r}")


def check_request(request: GenerateRequest) -> None:
    """Every field of a request that can be checked without the pipeline, with the field's name."""
    if isinstance(request.steps, bool) or not isinstance(request.steps, int) or request.steps < 1:
        raise ConfigError(f"steps must be an integer of at least 1, got {request.steps!r}")
    if isinstance(request.batch, bool) or not isinstance(request.batch, int) or request.batch < 1:
        raise ConfigError(f"batch must be an integer of at least 1, got {request.batch!r}")
    if isinstance(request.seed, bool) or not isinstance(request.seed, int) or not 0 <= request.seed <= MAX_SEED - request.batch:
        raise ConfigError(f"seed must be an integer from 0 to {MAX_SEED - request.batch}, got {request.seed!r}")
    check_finite_number("scale", request.scale)
    check_finite_number("guidance", request.guidance)
    if request.per_image and not request.adapters:
        raise ConfigError("per-image generation needs one adapter per image (use 'none' for no adapter)")
    if request.per_image and request.batch not in (1, len(request.adapters)):
        raise ConfigError(f"per-image batch of {request.batch} but {len(request.adapters)} adapters given")
    for name, side in (("width", request.width), ("height", request.height)):
        if side is not None and (isinstance(side, bool) or not isinstance(side, int) or side < 8 or side % 8):
            raise ConfigError(f"{name} must be a multiple of 8 (at least 8), got {side!r}")
