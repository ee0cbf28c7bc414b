"""The request scheduler: concurrent generation requests (the API, the UI's chat and compare mode, the
Evaluate tab), each with its own adapters and sampling settings, share the model.

On loaders with a Decoder (transformers, GPTQ, bitsandbytes, llama.cpp) batching is continuous: one worker
thread steps the decoder, a request joins the running batch at the next step (when the decoder says its
adapter stack can join: any single adapter on the transformers family, the same stack on llama.cpp) and
leaves as soon as it ends — end of sequence, its token budget, a stop string, or its consumer going away
(a closed HTTP stream cancels its request). Requests are admitted in arrival order; one that cannot join
waits, and the ones behind it wait with it, until the batch drains (no request overtakes another for ever).
Prompts are tokenized by the caller's thread, outside the model's lock.
Loaders without a decoder go through `stream_batch`: requests are gathered for a short window and run
together, grouped by stack and settings. A remote engine (`concurrent`) batches by itself: each request goes
to it at once, in its own thread, with its own stack.
A request that names no adapters gets the stack active in the UI when its batch starts; no request ever
changes what another one uses, and the UI's active stack (and a merge) is as it was once the batch is done.
While something else waits for the model (a load, an adapter change in the UI) no new request is admitted,
so it gets the model as soon as the running requests end.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

from webui.backends.base import Backend, RowDelta, stack_kept
from webui.options.config import GenerationParams

from .stack import UI_STACK, AdapterStack, Stack, stack_of
from .stop_strings import StopStringFilter

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Delta:
    """A piece of the reply's text."""

    text: str


@dataclass(frozen=True)
class Done:
    """The reply ended: `reason` "stop", "length" or "cancelled"; `tokens` generated (None when a stop string ended
    the reply: the backend's count is of no use then); `ids` the generated ids where the loader reports them."""

    reason: str
    tokens: int | None
    ids: list[int] | None = None


@dataclass(frozen=True)
class Failed:
    """The request could not run; the consumer raises `error`."""

    error: BaseException


Event = Delta | Done | Failed


@dataclass
class Job:
    prompt: str
    params: GenerationParams
    adapters: Stack  # an AdapterStack, or UI_STACK: the engine's active stack when the job runs
    events: queue.Queue = field(default_factory=queue.Queue)
    cancel: threading.Event = field(default_factory=threading.Event)
    finished: bool = False
    ids: list[int] | None = None  # the prompt tokenized by the caller's thread ...
    ids_for: object = None        # ... with this backend (tokenized again if the model changed since)
    whole: bool = False           # the consumer wants the reply at the end, not delta by delta

    def __post_init__(self):
        self.stops = StopStringFilter(self.params.stop)
        self._held: list[str] = []

    def emit(self, event: Event) -> None:
        """Queue an event for the consumer. For a consumer of the whole reply, deltas are held and queued as
        one at the end: a thread waking on every token of every row costs the batch's own compute threads
        their cores (measured on 2 cores: 4 non-streamed replies woke 4 threads per decode step)."""
        if self.finished:
            return
        if isinstance(event, Delta) and self.whole:
            self._held.append(event.text)
            return
        if self._held:
            self.events.put(Delta("".join(self._held)))
            self._held = []
        self.events.put(event)
        self.finished = not isinstance(event, Delta)


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
                event = self.job.events.get()
                if isinstance(event, Delta):
                    yield event.text
                elif isinstance(event, Done):
                    self.finish_reason, self.completion_tokens, self.token_ids = event.reason, event.tokens, event.ids
                    return
                else:
                    raise event.error
        finally:
            self.close()

    def text(self) -> str:
        """The whole reply, once it ends (the deltas queued before this call come first, in order)."""
        self.job.whole = True
        return "".join(self)

    def close(self) -> None:
        self.job.cancel.set()


def _batch_key(params: GenerationParams) -> tuple:
    data = dataclasses.asdict(params)
    data.pop("stop")  # stop strings are applied per request
    return tuple(sorted(data.items()))


def _has_decoder(backend) -> bool:
    """Does this backend's loader batch continuously (it overrides Backend.decoder)?"""
    return backend is not None and getattr(type(backend), "decoder", Backend.decoder) is not Backend.decoder


@dataclass
class _Live:
    """A request in the continuous batch."""
    job: Job
    budget: int                 # tokens it may generate
    ids: list[int] = field(default_factory=list)  # generated so far


class Scheduler:
    def __init__(self, engine, window_s: float = 0.02, max_batch: int = 8):
        # window_s: how long the first request of a static batch waits for company (20 ms is well under one
        # decode step of even a small model on CPU); max_batch: rows per forward pass on the static path (a
        # decoder has its own capacity).
        self.engine, self.window_s, self.max_batch = engine, window_s, max_batch
        self._pending: list[Job] = []
        self._cond = threading.Condition()
        self._worker: threading.Thread | None = None
        self._keys = itertools.count()

    def submit(self, prompt: str, params: GenerationParams, adapters: Stack = UI_STACK,
               cancel: threading.Event | None = None) -> JobHandle:
        """Queue a request (Engine.submit is the public door; this is its private part)."""
        job = Job(prompt, params, stack_of(adapters), cancel=cancel or threading.Event())
        backend = self.engine.current_backend()
        if _has_decoder(backend):
            try:  # here, in the caller's thread, not in the worker that steps the batch
                job.ids, job.ids_for = backend.tokenize(prompt), backend
            except Exception:  # a model being replaced: the worker tokenizes it, and reports a real problem
                job.ids = None
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
            while self.engine.model_wanted:  # a model change waits: let it take the model first
                time.sleep(0.005)
            if not _has_decoder(self.engine.current_backend()):
                time.sleep(self.window_s)  # let concurrent requests join the static batch
            jobs: list[Job] = []
            try:
                with self.engine.locked_backend() as backend:
                    decoder = backend.decoder()
                    if decoder is not None:
                        self._run_continuous(backend, decoder)
                        continue
                    with self._cond:
                        jobs, self._pending = self._pending, []
                    self._run(backend, jobs)
            except Exception as e:  # never let the worker die; every request it was serving hears why
                log.exception("batch failed")
                if not jobs:  # it failed before taking any (no model loaded): the waiting ones
                    with self._cond:
                        jobs, self._pending = self._pending, []
                for job in jobs:
                    job.emit(Failed(e))

    # -- continuous batching (loaders with a Decoder) -------------------------------------------------------
    def _run_continuous(self, backend, decoder) -> None:
        """Step `decoder` until no request is left, admitting new ones between steps."""
        default = backend.active_adapters  # what requests that name no adapters get
        live: dict[int, _Live] = {}
        try:
            while True:
                self._admit(backend, decoder, default, live)
                if not live:
                    return
                for key, token, text in decoder.step():
                    if key in live:
                        self._deliver(decoder, live, key, token, text)
                for key in [k for k, row in live.items() if row.job.cancel.is_set()]:
                    live.pop(key).job.emit(Done("cancelled", 0))
                    decoder.remove(key)
        except Exception as e:  # the batch is lost (its cache may be half-updated); every request in it hears why
            log.exception("continuous batch failed")
            for row in live.values():
                row.job.emit(Failed(e))
        finally:
            try:
                decoder.close()
            except Exception:
                log.exception("could not restore the active adapters after a batch")

    def _admit(self, backend, decoder, default: dict, live: dict) -> None:
        """Queued requests into the batch, in arrival order, while there is room, nothing waits for the model,
        and the next one's stack can join."""
        with self._cond:
            while self._pending and len(decoder) < decoder.capacity and not self.engine.model_wanted:
                job = self._pending[0]
                spec = default if job.adapters is UI_STACK else job.adapters
                if not job.cancel.is_set() and not decoder.can_join(spec):
                    return
                self._pending.pop(0)
                if job.cancel.is_set():
                    job.emit(Done("cancelled", 0))
                    continue
                key = next(self._keys)
                try:
                    ids = job.ids if job.ids is not None and job.ids_for is backend else backend.tokenize(job.prompt)
                    live[key] = _Live(job, decoder.add(key, ids, job.params, spec))
                except Exception as e:  # this request cannot run (too long, an adapter not loaded): only it fails
                    job.emit(Failed(e))

    def _deliver(self, decoder, live: dict, key: int, token: int, text: str) -> None:
        row = live[key]
        job = row.job
        if decoder.is_end(token):
            return self._finish(decoder, live, key, "stop", row.ids + [token])
        row.ids.append(token)
        out = job.stops.feed(text)
        if out:
            job.emit(Delta(out))
        if job.stops.stopped:
            job.emit(Done("stop", None))
            live.pop(key)
            decoder.remove(key)
        elif len(row.ids) >= row.budget:
            self._finish(decoder, live, key, "length", list(row.ids))

    def _finish(self, decoder, live: dict, key: int, reason: str, ids: list[int]) -> None:
        row = live.pop(key)
        job = row.job
        out = job.stops.feed(decoder.flush(key))
        if not job.stops.stopped:
            out += job.stops.flush()
        if out:
            job.emit(Delta(out))
        if job.stops.stopped:
            job.emit(Done("stop", None))
        else:
            job.emit(Done(reason, len(row.ids), ids))
        decoder.remove(key)

    # -- static batches (loaders without one) -----------------------------------------------------------
    def _run(self, backend, jobs: list[Job]) -> None:
        if getattr(backend.capabilities, "concurrent", False):  # stand-in capabilities may lack it
            return self._run_concurrent(backend, jobs)
        default = backend.active_adapters
        mixed = backend.capabilities.mixed_batch
        groups: dict[tuple, list[tuple[Job, dict]]] = {}
        for job in jobs:
            if job.cancel.is_set():
                job.emit(Done("cancelled", 0))
                continue
            spec = default if job.adapters is UI_STACK else job.adapters
            kind = ("mixed",) if mixed and AdapterStack(spec).single else ("stack", tuple(sorted(spec.items())))
            groups.setdefault((_batch_key(job.params), kind), []).append((job, spec))
        with stack_kept(backend):  # the UI's stack, merged or not, is as it was afterwards
            for (_, kind), members in groups.items():
                for i in range(0, len(members), self.max_batch):
                    self._run_group(backend, kind, members[i:i + self.max_batch])

    def _run_concurrent(self, backend, jobs: list[Job]) -> None:
        """Every request to the engine at once, each in its own thread with its own stack; requests that arrive
        while some are running join at once (the model is held until none is left, so a model change waits)."""
        default = backend.active_adapters
        threads: list[threading.Thread] = []
        while True:
            for job in jobs:
                spec = default if job.adapters is UI_STACK else job.adapters
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
                job = jobs[event.row]
                if job.finished:
                    pass
                elif job.cancel.is_set():
                    job.emit(Done("cancelled", 0))
                elif isinstance(event, RowDelta):
                    out = job.stops.feed(event.text)
                    if out:
                        job.emit(Delta(out))
                    if job.stops.stopped:
                        job.emit(Done("stop", None))
                else:
                    tail = job.stops.flush()
                    if tail:
                        job.emit(Delta(tail))
                    job.emit(Done(event.reason, event.tokens, event.ids))
                if all(j.finished or j.cancel.is_set() for j in jobs):
                    cancel.set()  # nobody is listening any more: stop generating
        except Exception as e:
            for job in jobs:
                job.emit(Failed(e))
            if not isinstance(e, (ValueError, RuntimeError)):
                raise
        for job in jobs:  # a generation cut short by cancellation
            job.emit(Done("cancelled", 0))
