"""Serving many users: concurrent generate requests gathered into one per-image batch.

Continuous batching as S-LoRA does it for LLMs, for diffusion: callers ``submit`` requests from
any thread and get a ``Future``; one worker thread takes the oldest waiting request, waits for
more requests with the same batch settings (steps, size, scheduler, guidance: what one pipeline
call must share) while they keep arriving (``window_s`` after the last one, ``max_wait_s``
after the oldest), and runs them as one batch of at most ``max_images`` images through
``Engine.run_jobs``: one merged adapter when every image uses the same mix, per-image hooks
otherwise. Prompts, negative prompts, seeds and adapters differ freely between images. Each caller gets exactly its own images, the same
(to float rounding) as ``Engine.generate`` of its request alone, since every image keeps its
own seed's generator and rows of a batch do not interact.

An image that comes out non-finite fails only its own request; a batch that raises is re-run
request by request, so one bad request cannot fail the others.

A request submitted with a ``stop`` event is interrupted at the next denoising step after the
event is set: its future raises `studio.errors.Interrupted` at once and the batch goes on for
the others; when every request of the running batch has stopped, the pipeline's loop is
interrupted too (the engine's ``on_step`` hook), so the engine is free for the next batch.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from studio.engine.request import GeneratedImage, GenerateRequest
from studio.engine.schedulers import scheduler_choice
from studio.errors import ConfigError, Interrupted

if TYPE_CHECKING:
    from studio.engine.engine import Engine, ImageJob

_STOP = object()


@dataclass
class BatcherConfig:
    """How long and how large the batcher gathers."""

    window_s: float = field(default=0.025, metadata={
        "help": "seconds a batch that is not full waits after the last compatible arrival for one more"})
    max_wait_s: float = field(default=0.1, metadata={
        "help": "seconds the oldest waiting request waits at most before its batch runs"})
    max_images: int = field(default=8, metadata={"help": "most images in one batch (one pipeline call)"})

    def __post_init__(self) -> None:
        if not 0 <= self.window_s <= self.max_wait_s <= 10:
            raise ConfigError(f"need 0 <= window_s <= max_wait_s <= 10 seconds, got {self.window_s!r} and {self.max_wait_s!r}")
        if isinstance(self.max_images, bool) or not isinstance(self.max_images, int) or self.max_images < 1:
            raise ConfigError(f"max_images must be an integer of at least 1, got {self.max_images!r}")


@dataclass(eq=False)
class Pending:
    """A submitted request: its resolved images, batch key, arrival time and future."""

    request: GenerateRequest
    jobs: list["ImageJob"]
    key: tuple
    arrived: float
    future: Future = field(default_factory=Future)
    stop: threading.Event | None = None
    on_step: Callable[[int, int], None] | None = None

    def stopped(self, step: int, total: int) -> bool:
        """True (and the future failed with Interrupted) once the caller asked to stop."""
        if self.stop is not None and self.stop.is_set() and not self.future.done():
            self.future.set_exception(Interrupted(f"generation interrupted at step {step} of {total}; nothing was saved"))
        return self.future.done()


class Batcher:
    """Gathers concurrent requests to one engine into per-image batches (see the module docstring)."""

    def __init__(self, engine: "Engine", config: BatcherConfig | None = None, start: bool = True):
        self.engine = engine
        self.config = config or BatcherConfig()
        self.batch_sizes: list[int] = []  # images per pipeline call, in order (for reports and tests)
        self._queue: queue.Queue = queue.Queue()
        self._backlog: list[Pending] = []
        self._thread: threading.Thread | None = None
        self._closed = False
        if start:
            self.start()

    def submit(self, request: GenerateRequest, stop: threading.Event | None = None,
               on_step: Callable[[int, int], None] | None = None) -> "Future[list[GeneratedImage]]":
        """Queue a request; its future resolves to its images (or its error).

        Bad requests (invalid fields, unknown adapters, NaN weights) raise here, in the caller's
        thread, before anything is queued. ``stop`` and ``on_step``: see the module docstring.
        """
        if self._closed:
            raise RuntimeError("this batcher is closed")
        pending = Pending(request, self.engine.jobs(request), batch_key(self.engine, request), time.monotonic(),
                          stop=stop, on_step=on_step)
        self._queue.put(pending)
        return pending.future

    def start(self) -> None:
        """Start the worker thread (requests submitted before start wait for it)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="studio-batcher", daemon=True)
            self._thread.start()

    def close(self, wait: bool = True) -> None:
        """Run what is queued, then stop the worker."""
        if not self._closed:
            self._closed = True
            self._queue.put(_STOP)
        if wait and self._thread is not None:
            self._thread.join()

    def __enter__(self) -> "Batcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the worker ---------------------------------------------------------------------------

    def _loop(self) -> None:
        stopping = False
        while True:
            if not self._backlog:
                if stopping:
                    return
                item = self._queue.get()
                if item is _STOP:
                    return
                self._backlog.append(item)
            stopping = self._gather() or stopping
            self._run(self._take())

    def _gather(self) -> bool:
        """Wait (until the oldest's window closes or its batch is full) for more; True on stop."""
        oldest = self._backlog[0]
        last_arrival = max(p.arrived for p in self._backlog if p.key == oldest.key)
        stopping = False
        while not stopping and self._compatible_images(oldest.key) < self.config.max_images:
            deadline = min(oldest.arrived + self.config.max_wait_s, last_arrival + self.config.window_s)
            remaining = deadline - time.monotonic()
            try:
                item = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            stopping = item is _STOP
            if not stopping:
                self._backlog.append(item)
                if item.key == oldest.key:
                    last_arrival = item.arrived
        while not stopping:  # whatever else arrived joins the backlog without waiting
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            stopping = item is _STOP
            if not stopping:
                self._backlog.append(item)
        return stopping

    def _compatible_images(self, key: tuple) -> int:
        return sum(len(p.jobs) for p in self._backlog if p.key == key)

    def _take(self) -> list[Pending]:
        """The oldest request and, in arrival order, the compatible ones that fit beside it."""
        key, room = self._backlog[0].key, self.config.max_images
        batch: list[Pending] = []
        for pending in list(self._backlog):
            if pending.key == key and (not batch or len(pending.jobs) <= room):
                batch.append(pending)
                room -= len(pending.jobs)
                self._backlog.remove(pending)
        return batch

    def _run(self, batch: list[Pending]) -> None:
        batch = [p for p in batch if p.future.set_running_or_notify_cancel() and not p.stopped(0, p.request.steps)]
        if not batch:
            return
        jobs = [job for pending in batch for job in pending.jobs]
        try:
            results = self.engine.run_jobs(batch[0].request, jobs, _watch(batch))
        except BaseException as error:  # noqa: BLE001 - handed to the callers, never swallowed
            if len(batch) == 1:
                if not batch[0].future.done():
                    batch[0].future.set_exception(error)
            else:
                for pending in batch:  # one request may be the cause: run each alone
                    if not pending.future.done():
                        self._run_alone(pending)
            return
        self.batch_sizes.append(len(jobs))
        start = 0
        for pending in batch:
            _deliver(pending, results[start:start + len(pending.jobs)])
            start += len(pending.jobs)

    def _run_alone(self, pending: Pending) -> None:
        try:
            results = self.engine.run_jobs(pending.request, pending.jobs, _watch([pending]))
        except BaseException as error:  # noqa: BLE001
            if not pending.future.done():
                pending.future.set_exception(error)
            return
        self.batch_sizes.append(len(pending.jobs))
        _deliver(pending, results)


def _watch(batch: list[Pending]):
    """The engine's step hook for one batch: follow each request's ``on_step``, fail the stopped
    ones at once, interrupt the loop when none is left waiting."""
    def on_step(step: int, total: int) -> bool:
        for pending in batch:
            if pending.on_step is not None and not pending.future.done():
                pending.on_step(step, total)
        return all([pending.stopped(step, total) for pending in batch])
    return on_step


def _deliver(pending: Pending, results: list) -> None:
    """The request's own images, or the first error among them (nothing for a stopped request)."""
    if pending.future.done():
        return
    failure = next((r for r in results if isinstance(r, Exception)), None)
    if failure is not None:
        pending.future.set_exception(failure)
    else:
        pending.future.set_result(list(results))


def batch_key(engine: "Engine", request: GenerateRequest) -> tuple:
    """What images of one pipeline call must share: steps, size, scheduler, guidance."""
    scheduler = None
    if request.scheduler is not None:
        choice = scheduler_choice(request.scheduler, engine.base.target == "flow")
        scheduler = (choice.class_name, tuple(sorted(choice.options.items())))
    return (int(request.steps), engine.size_of(request), scheduler, float(engine.guidance_of(request)))
