"""The request scheduler: concurrent generation requests (the API, the UI's compare mode), each with its
own adapters, are gathered for a short window and run together.

On loaders with `mixed_batch` (transformers, GPTQ) requests for the plain base or for single adapters
at weight 1 share one forward pass (PEFT's `adapter_names`, one adapter per row); requests with a
weighted stack are batched with others of the same stack while that stack is active. On other loaders
(llama.cpp) requests run in turn, each with its own adapters set just before it. A remote engine
(`concurrent`) batches by itself: each request goes to it at once, in its own thread, with its own stack,
and requests that arrive meanwhile are sent at once too. A request that names no
adapters gets the stack active in the UI at the time it runs; no request ever changes what another one
uses, and the UI's active stack is restored after every group. A consumer that goes away (a closed HTTP
stream) cancels its request; a batch stops early once none of its requests is listening.
"""
from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

from webui.config import GenerationParams
from webui.stop_strings import StopStringFilter

log = logging.getLogger(__name__)


@dataclass
class Job:
    prompt: str
    params: GenerationParams
    adapters: dict | None  # None: the engine's active stack when the job runs
    events: queue.Queue = field(default_factory=queue.Queue)
    cancel: threading.Event = field(default_factory=threading.Event)
    finished: bool = False

    def __post_init__(self):
        self.stops = StopStringFilter(self.params.stop)

    def emit(self, kind: str, *payload) -> None:
        if not self.finished:
            self.events.put((kind, *payload))
            self.finished = kind in ("done", "error")


class JobHandle:
    """Iterate for the reply's text deltas; afterwards `finish_reason` and `completion_tokens` are set
    (`completion_tokens` is None when a stop string ended the reply: the backend's count is of no use then).
    `close()` (or leaving the iteration early) cancels the request."""

    def __init__(self, job: Job):
        self.job = job
        self.finish_reason = None
        self.completion_tokens = 0
        self.token_ids: list[int] | None = None  # the generated ids, when the loader reports them

    def __iter__(self):
        try:
            while True:
                kind, *payload = self.job.events.get()
                if kind == "delta":
                    yield payload[0]
                elif kind == "done":
                    self.finish_reason, self.completion_tokens = payload[:2]
                    self.token_ids = payload[2] if len(payload) > 2 else None
                    return
                else:
                    raise payload[0]
        finally:
            self.close()

    def text(self) -> str:
        return "".join(self)

    def close(self) -> None:
        self.job.cancel.set()


def _batch_key(params: GenerationParams) -> tuple:
    data = dataclasses.asdict(params)
    data.pop("stop")  # stop strings are applied per request
    return tuple(sorted(data.items()))


class Scheduler:
    def __init__(self, engine, window_s: float = 0.02, max_batch: int = 8):
        # window_s: how long the first request of a batch waits for company (20 ms is well under one
        # decode step of even a small model on CPU); max_batch: rows per forward pass.
        self.engine, self.window_s, self.max_batch = engine, window_s, max_batch
        self._pending: list[Job] = []
        self._cond = threading.Condition()
        self._worker: threading.Thread | None = None

    def submit(self, prompt: str, params: GenerationParams, adapters: dict | None = None) -> JobHandle:
        job = Job(prompt, params, None if adapters is None else dict(adapters))
        with self._cond:
            self._pending.append(job)
            if self._worker is None:
                self._worker = threading.Thread(target=self._loop, name="scheduler", daemon=True)
                self._worker.start()
            self._cond.notify()
        return JobHandle(job)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._pending:
                    self._cond.wait()
            time.sleep(self.window_s)  # let concurrent requests join the batch
            with self._cond:
                jobs, self._pending = self._pending, []
            try:
                self._run(jobs)
            except Exception as e:  # never let the worker die; every waiting request hears why
                log.exception("batch failed")
                for job in jobs:
                    job.emit("error", e)

    def _run(self, jobs: list[Job]) -> None:
        with self.engine.locked_backend() as backend:
            if getattr(backend.capabilities, "concurrent", False):  # stand-in capabilities may lack it
                return self._run_concurrent(backend, jobs)
            default, was_merged = backend.active_adapters, backend.merged
            mixed = backend.capabilities.mixed_batch
            groups: dict[tuple, list[tuple[Job, dict]]] = {}
            for job in jobs:
                if job.cancel.is_set():
                    job.emit("done", "cancelled", 0)
                    continue
                spec = default if job.adapters is None else job.adapters
                single = len(spec) == 0 or (len(spec) == 1 and next(iter(spec.values())) == 1.0)
                kind = ("mixed",) if mixed and single else ("stack", tuple(sorted(spec.items())))
                groups.setdefault((_batch_key(job.params), kind), []).append((job, spec))
            try:
                for (_, kind), members in groups.items():
                    for i in range(0, len(members), self.max_batch):
                        self._run_group(backend, kind, members[i:i + self.max_batch])
            finally:  # the UI's stack, merged or not, is as it was
                if backend.active_adapters != default:
                    backend.set_adapters(default)
                if was_merged and not backend.merged:
                    backend.merge_adapters()

    def _run_concurrent(self, backend, jobs: list[Job]) -> None:
        """Every request to the engine at once, each in its own thread with its own stack; requests that arrive
        while some are running join at once (the model is held until none is left, so a model change waits)."""
        default = backend.active_adapters
        threads: list[threading.Thread] = []
        while True:
            for job in jobs:
                spec = default if job.adapters is None else job.adapters
                thread = threading.Thread(target=self._run_group, args=(backend, ("own",), [(job, spec)]),
                                          name="scheduler-request", daemon=True)
                thread.start()
                threads.append(thread)
            threads = [t for t in threads if t.is_alive()]
            with self._cond:
                if not self._pending:
                    if not threads:
                        return
                    self._cond.wait(timeout=0.05)  # a new request, or time to see which threads ended
                jobs, self._pending = self._pending, []

    def _run_group(self, backend, kind: tuple, members: list[tuple[Job, dict]]) -> None:
        jobs = [job for job, _ in members]
        if kind[0] == "mixed":
            # one adapter per row; None = the plain base (even while the UI has adapters active)
            adapter_names = [next(iter(spec), None) for _, spec in members]
        elif kind[0] == "own":  # a concurrent backend: each row's whole stack
            adapter_names = [spec for _, spec in members]
        else:
            adapter_names = None
            if backend.active_adapters != members[0][1]:
                backend.set_adapters(members[0][1])
        cancel = threading.Event()
        try:
            for event in backend.stream_batch([j.prompt for j in jobs], jobs[0].params, adapter_names, cancel):
                job = jobs[event[1]]
                if job.finished:
                    pass
                elif job.cancel.is_set():
                    job.emit("done", "cancelled", 0)
                elif event[0] == "delta":
                    out = job.stops.feed(event[2])
                    if out:
                        job.emit("delta", out)
                    if job.stops.stopped:
                        job.emit("done", "stop", None)
                else:
                    tail = job.stops.flush()
                    if tail:
                        job.emit("delta", tail)
                    job.emit("done", event[2], event[3], event[4] if len(event) > 4 else None)
                if all(j.finished or j.cancel.is_set() for j in jobs):
                    cancel.set()  # nobody is listening any more: stop generating
        except Exception as e:
            for job in jobs:
                job.emit("error", e)
            if not isinstance(e, (ValueError, RuntimeError)):
                raise
        for job in jobs:  # a generation cut short by cancellation
            job.emit("done", "cancelled", 0)
