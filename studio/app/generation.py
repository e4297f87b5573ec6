"""The Generate tab's services: a form becomes a `studio.verbs.generate` request over registered
adapter names, run through the engine's request batcher (concurrent clients' requests are
gathered into per-image batches), followed step by step, stoppable per browser session.

Adapter names are checked against the collection before anything else: a name that is not a
registered adapter is refused, so no name a client sends can reach a file. The caps are the
server's (`AppConfig.limits`, checked by the verb before any work). Seed -1 is a random seed
(the verb picks it; the PNG info records it).
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from studio.engine import GeneratedImage, GenerateRequest, check_name
from studio.errors import ConfigError, StudioError
from studio.app.forms import GenerateForm
from studio.verbs import generate as generate_verb
from studio.verbs.generate import Watch

if TYPE_CHECKING:
    from studio.app.services import Studio

GALLERY_SIZE = 48
WORKERS = 16


@dataclass
class Generated:
    """Saved PNGs (parameters inside each), their labels and parameter texts."""

    paths: list[Path]
    labels: list[str]
    infotexts: list[str]
    sizes: list[tuple[int, int]]
    seconds: float


@dataclass
class Following:
    """One generation in flight: its watch (stop flag, step counter) and its future."""

    watch: Watch
    future: Future
    done: int = 0
    total: int = 0
    started: float = field(default_factory=time.monotonic)

    def step(self, done: int, total: int) -> None:
        self.done, self.total = done, total


class Generation:
    """Generations per browser session (so Interrupt stops the caller's own), one thread each."""

    def __init__(self, studio: "Studio"):
        self.studio = studio
        self.lock = threading.Lock()
        self.sessions: dict[str, list[Following]] = {}
        self.pool = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="studio-generate")

    def start(self, form: GenerateForm, session: str) -> Following:
        """Check the names, build the request, and start the verb in a worker thread."""
        engine = self.studio.require_engine()
        request = self.request(form, set(self.studio.names()))
        watch = Watch(threading.Event())
        following = Following(watch, Future())
        watch.on_step = following.step
        following.future = self.pool.submit(self._run, request, engine, watch)
        with self.lock:
            self.sessions.setdefault(session, []).append(following)
        following.future.add_done_callback(lambda _: self._forget(session, following))
        return following

    def generate(self, form: GenerateForm, session: str = "") -> Generated:
        """Start and wait (what API tests and the parity checks call)."""
        return self.start(form, session).future.result()

    def interrupt(self, session: str) -> int:
        """Stop every generation of this session at its next denoising step; how many."""
        with self.lock:
            running = list(self.sessions.get(session, []))
        for following in running:
            following.watch.stop.set()
        return len(running)

    def _forget(self, session: str, following: Following) -> None:
        with self.lock:
            items = self.sessions.get(session, [])
            if following in items:
                items.remove(following)
            if not items:
                self.sessions.pop(session, None)

    def _run(self, request: GenerateRequest, engine, watch: Watch) -> Generated:
        done = generate_verb.run(request, engine, names=set(engine.names()), watch=watch, batched=True)
        paths = self._save(done.images)
        return Generated(paths, [label_of(i) for i in done.images], [i.infotext for i in done.images],
                         [i.image.size for i in done.images], done.seconds)

    def request(self, form: GenerateForm, registered: set[str]) -> GenerateRequest:
        """The form as a GenerateRequest over registered names (any other name is refused)."""
        adapters = [name.strip() for name in form.adapters if name.strip()]
        weights = weight_list(form.weights, len(adapters))
        specs = []
        for name, weight in zip(adapters, weights):
            if name == "none":
                specs.append("none")
                continue
            check_name(name)
            if name not in registered:
                raise StudioError(f"no adapter named {name!r} in the collection")
            specs.append(f"{name}:{weight!r}")
        batch = len(specs) if form.mode == "per_image" else form.batch
        return GenerateRequest(
            prompt=form.prompt, base=self.studio.base, negative_prompt=form.negative_prompt, adapters=specs,
            per_image=form.mode == "per_image", grid=form.mode == "grid", seed=form.seed, steps=form.steps,
            guidance=form.guidance or None, width=form.width or None, height=form.height or None,
            scheduler=None if form.scheduler in ("", "default") else form.scheduler, batch=batch, scale=form.strength,
            limits=self.studio.config.limits,
        )

    def _save(self, images: list[GeneratedImage]) -> list[Path]:
        folder = self.studio.workspace.folder("outputs")
        stamp = time.strftime("%Y%m%d-%H%M%S") + f"-{time.perf_counter_ns() % 1_000_000:06d}"
        return [image.save(folder / f"{stamp}-{i}.png") for i, image in enumerate(images)]

    def gallery(self, limit: int = GALLERY_SIZE) -> list[Path]:
        """The newest PNGs of the workspace's outputs."""
        pngs = sorted(self.studio.workspace.folder("outputs").glob("*.png"), key=os.path.getmtime, reverse=True)
        return pngs[:limit]

    def reuse(self, path: str | Path) -> dict[str, Any]:
        """The form fields an image was made with (A1111's "send to txt2img"), from its PNG info."""
        from studio.engine import read_png_parameters
        from studio.engine.schedulers import SCHEDULERS

        params = read_png_parameters(path)
        names = [name for name, _ in params.adapters]
        sampler = next((key for key, choice in SCHEDULERS.items() if choice.label == params.sampler), "default")
        grid = params.extra.get("Grid")
        return {
            "prompt": params.prompt, "negative_prompt": params.negative_prompt, "steps": params.steps, "seed": params.seed,
            "guidance": params.cfg_scale, "width": params.width, "height": params.height, "scheduler": sampler,
            "adapters": [n.strip() for n in grid.split("|")] if grid else names, "mode": "grid" if grid else "mix",
            "weights": "" if grid else ", ".join(f"{w:g}" for _, w in params.adapters),
        }


def weight_list(text: str, count: int) -> list[float]:
    """'0.8, 1' as one weight per adapter; empty: 1 each; more weights than adapters is an error."""
    try:
        weights = [float(part) for part in (text or "").replace(";", ",").split(",") if part.strip()]
    except ValueError as error:
        raise ConfigError(f"weights {text!r}: give numbers separated by commas, e.g. 1, 0.5") from error
    if len(weights) > count:
        raise ConfigError(f"weights {text!r}: {len(weights)} weights for {count} adapter{'s' if count != 1 else ''}; "
                          "give one weight per adapter")
    return weights + [1.0] * (count - len(weights))


def label_of(image: GeneratedImage) -> str:
    """A per-image caption: its adapters and weights, and its seed."""
    params = image.parameters
    if "Grid" in params.extra:
        return f"grid: {params.extra['Grid']} (seed {params.seed})"
    adapters = " + ".join(f"{name} {weight:g}" for name, weight in params.adapters) or "no adapter"
    return f"{adapters} (seed {params.seed})"
