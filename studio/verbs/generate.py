"""`studio generate --prompt P -o OUT.png`: images from a base and adapters (merged, mixed, one
adapter per image, a same-seed grid), with their parameters in each PNG.

`GenerateRequest` is THE generation request: the CLI's flags, the app's form and a recipe's
``[generate]`` table fill it in, and the engine takes it (`studio.engine.GenerateRequest` is this
class). `check` validates every field and the size caps of `Limits` (pixels, sides, steps, batch,
guidance, adapter weights) before any model is loaded; `run` then loads the engine and refuses a
request whose memory estimate (`Engine.estimate`) does not fit in what the device has free.
"""

from __future__ import annotations

import math
import secrets
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Literal

from studio.errors import ConfigError, Interrupted, LimitError
from studio.options import check as check_fields
from studio.options import Cli, option
from studio.verbs import checks
from studio.verbs.result import VerbResult

DtypeName = Literal["auto", "float32", "float16", "bfloat16"]
DEFAULT_GUIDANCE = {"world": 4.0}
FALLBACK_GUIDANCE = 7.5
FAMILY_GUIDANCE = {"flux1": 3.5, "sd3": 7.0}  # the pipelines' own defaults (FLUX.1-dev's embedded guidance)
GRID_COLUMNS = 4  # a comparison of up to 4 adapters is one row
LATENT_STEP = 8  # image sides are multiples of the VAE's downscale factor
MAX_THREADS = 1024
PNG = ".png"
SERVING_MAX_SECONDS = 600.0  # the app's cap: one generation holds the engine for every client
RANDOM_SEED = -1  # seed -1: a random seed, chosen when the request runs (as A1111 does)
RANDOM_SEED_BITS = 32


@dataclass
class Limits:
    """Caps checked before anything is allocated (the app sets its own; `studio generate` takes flags)."""

    max_pixels: int = option(2048 * 2048, "largest width x height of one image", minimum=LATENT_STEP * LATENT_STEP)
    max_side: int = option(8192, "largest width or height", minimum=LATENT_STEP)
    max_steps: int = option(200, "most denoising steps", minimum=1)
    max_batch: int = option(16, "most images in one request", minimum=1)
    max_guidance: float = option(50.0, "largest CFG scale", minimum=0)
    max_weight: float = option(20.0, "largest |adapter weight x strength|", minimum=0)
    check_memory: bool = option(True, "refuse a request whose memory estimate exceeds what the device has free")
    max_seconds: float = option(0.0, "refuse a request the engine estimates to take longer than this (0: no limit; the "
                                "estimate is FLOPs over the throughput this engine measured, else a stated guess)", minimum=0)


@dataclass
class GenerateRequest:
    """One generation: prompt, base, adapters and settings, and where the PNGs go.

    ``adapters`` are SPECs (``FILE[:w]``, ``COLLECTION.safetensors#NAME[:w]``) or names registered
    in the engine; several mix into one. With ``per_image`` each image of the batch gets its own
    entry (``none`` for no adapter); with ``grid`` one same-seed image per entry becomes a labelled
    grid. Image i uses seed ``seed + i``. ``guidance`` None picks the base's usual value (4 for the
    world, else 7.5); ``width`` / ``height`` None pick the base's native size.
    """

    prompt: str = option(help="what to draw")
    base: str = option("world", "BASE: world, a diffusers folder, a .safetensors checkpoint, a hub id (online only)")
    negative_prompt: str = option("", "what not to draw")
    adapters: list[str] = option(default_factory=list, help="FILE[:weight] or COLLECTION.safetensors#NAME[:weight]; repeat to "
                                 "mix ('none': no adapter)", cli=Cli(repeat=True, flag="--adapter", metavar="SPEC"))
    per_image: bool = option(False, "each image of the batch gets its own --adapter")
    seed: int = option(0, "seed of the first image (image i: seed + i; -1: a random seed, written into the PNG info)",
                       minimum=RANDOM_SEED, maximum=checks.MAX_SEED)
    steps: int = option(25, "denoising steps", minimum=1)
    guidance: float | None = option(None, "CFG scale; on FLUX.1 the embedded guidance (default: 4 for the world, 3.5 FLUX.1-dev, none for schnell, 7 SD3, else 7.5)", minimum=0)
    width: int | None = option(None, "image width in pixels, a multiple of 8 (default: the base's native size)", minimum=LATENT_STEP)
    height: int | None = option(None, "image height in pixels, a multiple of 8 (default: the base's native size)", minimum=LATENT_STEP)
    scheduler: str | None = option(None, "sampler: ddim, euler, euler_a, dpm++, dpm++_karras, dpm++_sde, pndm, lms, heun, unipc, "
                                   "ddpm (default: the base's own)")
    batch: int = option(1, "images in one batch (seeds seed, seed+1, ...)", minimum=1)
    scale: float = option(1.0, "overall adapter strength")
    device: str | None = option(None, "cpu, cuda, cuda:N (default: cuda when available)")
    dtype: DtypeName = option("auto", "weight dtype (auto: float16 on cuda, float32 on cpu)")
    grid: bool = option(False, "a labelled same-seed grid, one cell per --adapter")
    output: str | None = option(None, "OUT.png (a batch writes OUT-0.png, OUT-1.png, ...); the app leaves it out and saves into its workspace",
                                cli=Cli(short="-o", required=True))
    threads: int | None = option(None, "CPU threads for torch (default: torch's own)", minimum=1, maximum=MAX_THREADS)
    limits: Limits = option(default_factory=Limits, help="size caps checked before anything loads")

    def guidance_for(self, base_label: str, family: str = "", mode: str = "cfg") -> float:
        """The guidance of this request on a base (``family`` / ``mode`` from its ``studio.bases.Base``):
        the world 4, FLUX.1-dev's embedded guidance 3.5, FLUX.1-schnell none (0), SD3 7, else 7.5."""
        if self.guidance is not None:
            return float(self.guidance)
        if mode == "none":
            return 0.0
        if base_label in DEFAULT_GUIDANCE:
            return DEFAULT_GUIDANCE[base_label]
        return FAMILY_GUIDANCE.get(family, FALLBACK_GUIDANCE)

    @property
    def images(self) -> int:
        """Images the pipeline makes in one call (one per adapter for per-image and grids)."""
        return len(self.adapters) if self.per_image or self.grid else self.batch


@dataclass
class GenerateResult(VerbResult):
    """The images (`studio.engine.GeneratedImage`), where they were saved, the estimate, the time."""

    images: list[Any]
    paths: list[Path]
    seconds: float
    estimate: Any = None  # studio.engine.estimate.RequestEstimate
    warnings: list[str] = field(default_factory=list)

    def as_json(self) -> dict:
        return {"paths": [str(p) for p in self.paths], "infotexts": [i.infotext for i in self.images],
                "sizes": [list(i.image.size) for i in self.images], "seconds": self.seconds,
                "estimate_bytes": self.estimate.peak_bytes if self.estimate is not None else None}

    def as_text(self) -> str:
        return "\n".join(str(path) for path in self.paths)


@dataclass
class Watch:
    """How a front end follows and stops one generation (the app's progress and Interrupt button):
    ``on_step(done, total)`` after each denoising step; ``stop`` set ends it at the next step
    with `studio.errors.Interrupted` (nothing is saved)."""

    stop: threading.Event | None = None
    on_step: Callable[[int, int], None] | None = None

    def hook(self) -> Callable[[int, int], bool]:
        """The engine's step hook: report the step, True (interrupt) once stop is set."""
        def on_step(done: int, total: int) -> bool:
            if self.on_step is not None:
                self.on_step(done, total)
            return self.stop is not None and self.stop.is_set()
        return on_step

    def check(self, where: str = "generation") -> None:
        """Raise Interrupted when stop was set (after the engine returned)."""
        if self.stop is not None and self.stop.is_set():
            raise Interrupted(f"{where} interrupted; nothing was saved")


def with_seed(request: GenerateRequest) -> GenerateRequest:
    """The request with seed -1 replaced by a random seed (any other seed unchanged)."""
    if request.seed != RANDOM_SEED:
        return request
    return replace(request, seed=secrets.randbits(RANDOM_SEED_BITS))


def output_paths(output: str | Path, count: int) -> list[Path]:
    """OUT.png for one image, OUT-0.png ... for several."""
    output = Path(output)
    if count == 1:
        return [output]
    return [output.with_name(f"{output.stem}-{i}{output.suffix or PNG}") for i in range(count)]


def check(request: GenerateRequest, names: set[str] | frozenset[str] = frozenset()) -> None:
    """Every field and every cap, before any model loads. ``names``: adapters registered in the
    engine (the app's); every other SPEC must name an existing file (and collection member)."""
    check_fields(request, "generate")
    if not request.prompt.strip():
        raise ConfigError("generate: prompt: the prompt is empty")
    checks.device("device", request.device)
    _check_sizes(request)
    _check_schedule(request)
    inputs = _check_adapters(request, names)
    if request.output is not None:
        for path in output_paths(request.output, 1 if request.grid else request.images):
            checks.output_file("output", path, inputs, suffix=PNG)


def _check_sizes(request: GenerateRequest) -> None:
    limits = request.limits
    for name, side in (("width", request.width), ("height", request.height)):
        if side is not None and side % LATENT_STEP:
            raise ConfigError(f"generate: {name} = {side}: must be a multiple of {LATENT_STEP}")
        if side is not None and side > limits.max_side:
            raise LimitError(f"generate: {name} = {side}: above the cap of {limits.max_side} px (limits.max_side)")
    if request.width is not None and request.height is not None:
        check_pixels(request.width, request.height, limits)
    if request.images > limits.max_batch:
        raise LimitError(f"generate: {request.images} images in one request: above the cap of {limits.max_batch} (limits.max_batch)")
    if request.seed > checks.MAX_SEED - request.images:
        raise ConfigError(f"generate: seed = {request.seed}: must be at most {checks.MAX_SEED - request.images} "
                          f"(image i uses seed + i, a signed 64-bit number)")


def check_pixels(width: int, height: int, limits: Limits) -> None:
    """Width x height within the cap (also checked with the base's native size once it is known)."""
    if width * height > limits.max_pixels:
        raise LimitError(f"generate: {width}x{height} = {width * height / 1e6:.1f} MP: above the cap of "
                         f"{limits.max_pixels / 1e6:.1f} MP (limits.max_pixels)")


def _check_schedule(request: GenerateRequest) -> None:
    limits = request.limits
    if request.steps > limits.max_steps:
        raise LimitError(f"generate: steps = {request.steps}: above the cap of {limits.max_steps} (limits.max_steps)")
    if request.guidance is not None and request.guidance > limits.max_guidance:
        raise LimitError(f"generate: guidance = {request.guidance:g}: above the cap of {limits.max_guidance:g} (limits.max_guidance)")
    if request.scheduler is not None:
        from studio.engine.schedulers import SCHEDULERS

        if request.scheduler not in SCHEDULERS:
            raise ConfigError(f"generate: scheduler {request.scheduler!r} is not known; use one of {', '.join(SCHEDULERS)}")
    if request.per_image and request.grid:
        raise ConfigError("generate: per_image and grid: choose one")
    if (request.per_image or request.grid) and not request.adapters:
        raise ConfigError("generate: per-image generation and grids need one adapter per image (adapters: 'none' for no adapter)")
    if request.per_image and request.batch not in (1, len(request.adapters)):
        raise ConfigError(f"generate: a per-image batch of {request.batch} but {len(request.adapters)} adapters given")


def _check_adapters(request: GenerateRequest, names: set[str] | frozenset[str]) -> list[Path]:
    """Each SPEC parses, its weight is within the cap, its file (and member) exists; the files."""
    from studio.engine.specs import parse_spec

    if not math.isfinite(request.scale) or abs(request.scale) > request.limits.max_weight:
        raise LimitError(f"generate: scale = {request.scale:g}: must be a finite number within "
                         f"+-{request.limits.max_weight:g} (limits.max_weight)")
    files = []
    for text in request.adapters:
        spec = parse_spec(text)
        if abs(spec.weight * request.scale) > request.limits.max_weight:
            raise LimitError(f"generate: adapter {text!r}: weight x strength {spec.weight * request.scale:g} is beyond "
                             f"+-{request.limits.max_weight:g} (limits.max_weight)")
        if spec.is_none or (spec.member is None and spec.target in names):
            continue
        path = checks.existing_file("adapter", spec.target)
        if spec.member is not None:
            checks.collection_member("adapter", path, spec.member)
        files.append(path)
    return files


def run(request: GenerateRequest, engine: Any = None, names: set[str] | frozenset[str] = frozenset(),
        watch: Watch | None = None, batched: bool = False) -> GenerateResult:
    """Check, load the engine (or use ``engine``), refuse what does not fit, generate, save.

    ``batched``: through the engine's request batcher (`Engine.submit`), so that concurrent
    callers (the app's clients) share per-image batches; grids always run as one batch of their
    own. ``watch``: follow the denoising steps and stop them (`Watch`)."""
    from studio.engine import get_engine

    check(request, names)
    request = with_seed(request)
    if request.threads:
        import torch

        torch.set_num_threads(request.threads)
    engine = engine if engine is not None else get_engine(request.base, request.device, request.dtype)
    check_pixels(*engine.size_of(request), request.limits)
    estimate = check_cost(request, engine) if request.limits.check_memory or request.limits.max_seconds else None
    started = time.perf_counter()
    images = _images(request, engine, watch or Watch(), batched)
    seconds = time.perf_counter() - started
    paths = [] if request.output is None else [image.save(path) for image, path in zip(images, output_paths(request.output, len(images)))]
    return GenerateResult(images, paths, seconds, estimate)


def _images(request: GenerateRequest, engine: Any, watch: Watch, batched: bool) -> list:
    """The request's images: a grid, one batcher submission, or one direct engine call."""
    from studio.engine import comparison_grid, generate

    if request.grid:
        images = [comparison_grid(request, engine, min(len(request.adapters), GRID_COLUMNS), watch.hook())]
    elif batched:
        images = engine.submit(request, watch.stop, watch.on_step).result()
    else:
        images = generate(request, engine, watch.hook())
    watch.check()
    return images


def check_cost(request: GenerateRequest, engine: Any):
    """The engine's estimate of the request; LimitError when its activations exceed the free
    memory (``limits.check_memory``) or its time exceeds ``limits.max_seconds``."""
    estimate = engine.estimate(request if not request.grid else _as_per_image(request))
    device = engine.config.resolved_device()
    free = free_memory(device) if request.limits.check_memory else None
    needed = estimate.peak_bytes - estimate.weight_bytes  # the weights are loaded already
    if free is not None and needed > free:
        raise LimitError(f"generate: {estimate.width}x{estimate.height} x {estimate.images} images need about "
                         f"{checks.memory_text(needed)} beyond the loaded weights, and {device} has {checks.memory_text(free)} free: "
                         "fewer or smaller images")
    if request.limits.max_seconds and estimate.seconds > request.limits.max_seconds:
        raise LimitError(f"generate: {estimate.width}x{estimate.height} x {estimate.images} images, {estimate.steps} steps: "
                         f"about {estimate.seconds:.0f} s on {device} ({estimate.seconds_from}), above the cap of "
                         f"{request.limits.max_seconds:g} s (limits.max_seconds): fewer steps or smaller images")
    return estimate


def _as_per_image(request: GenerateRequest) -> GenerateRequest:
    from dataclasses import replace

    return replace(request, per_image=True, grid=False, batch=len(request.adapters))


def free_memory(device) -> int | None:
    """Bytes free on a torch device now (CUDA: the driver's count; CPU: MemAvailable); None if unknown."""
    import torch

    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type == "cpu":
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None
