"""The request scheduler against a fake backend that records every call: requests that arrive together share
one `stream_batch` call where the loader allows it (single adapters and the base in one mixed batch; a
weighted stack per stack; one batch per sampling setting; on a loader without mixed batches each stack set
just before it runs), stop strings cut each request on its own, a closed request is cancelled and a batch
nobody listens to stops, the UI's stack and merge state are back after every batch, and a failing batch
reports its error to every waiting request while the worker goes on serving.

No timing is asserted: "arriving together" is arranged by keeping the worker busy with a first request
while the others are submitted, and the tests wait on events with timeouts."""
from __future__ import annotations

import threading
from contextlib import contextmanager
from types import SimpleNamespace

import pytest

from webui.backends.base import RowDelta, RowDone
from webui.engine.scheduler import Delta, Done, Job, JobHandle, Scheduler
from webui.engine.stack import UI_STACK
from webui.options.config import GenerationParams

PARAMS = GenerationParams(temperature=0, max_new_tokens=64)
WAIT = 10  # seconds: a bound for waits that end at once when the code works


def label(stack: dict) -> str:
    """How the fake model names what a row ran with: "base", "A" or "A*0.5+B*0.5"."""
    return "+".join(f"{n}*{w:g}" if w != 1.0 else n for n, w in sorted(stack.items())) or "base"


def reply(prompt: str, used: str) -> str:
    """The fake model's full answer: it says which adapters it ran with, so a test can tell."""
    return f"[{used}] {prompt}: one two three four five"


class FakeBackend:
    """What the scheduler calls on a backend. Each row answers `reply(prompt, adapters used)` in 3-character
    deltas, rows interleaved as in a real batch; "endless" prompts run until the batch is cancelled."""

    def __init__(self, mixed: bool = True, active: dict | None = None, merged: bool = False):
        self.capabilities = SimpleNamespace(mixed_batch=mixed)
        self.active_adapters = dict(active or {})
        self.merged = merged
        self.calls: list[dict] = []   # one per stream_batch call
        self.log: list[tuple] = []    # set / merge / stream, in order
        self.fails: dict[str, BaseException] = {}  # prompt -> error raised by the batch that holds it
        self.hold_next = False        # the next stream_batch waits for `release` before its first event
        self.entered, self.release = threading.Event(), threading.Event()
        self.pause = threading.Event()  # a batch of "endless" prompts waits for it after its first round
        self.stopped_by_cancel: list[bool] = []

    def decoder(self):
        return None  # a loader without continuous batching: the static path under test here

    @property
    def adapters_loaded(self) -> dict:
        return {name: "cached" for name in "ABCD"}  # every adapter the tests name is cached

    def set_adapters(self, weights: dict) -> None:
        self.active_adapters, self.merged = dict(weights), False  # a new stack is never merged
        self.log.append(("set", dict(weights)))

    def merge_adapters(self) -> None:
        self.merged = True
        self.log.append(("merge",))

    def stream_batch(self, prompts, params, adapter_names, cancel):
        used = [label({n: 1.0} if n else {}) for n in adapter_names] if adapter_names is not None else \
            [label(self.active_adapters)] * len(prompts)
        self.calls.append({"prompts": list(prompts), "params": params, "adapter_names": adapter_names,
                           "active": dict(self.active_adapters), "cancel": cancel})
        self.log.append(("stream", tuple(prompts)))
        if self.hold_next:
            self.hold_next = False
            self.entered.set()
            assert self.release.wait(WAIT)
        for p in prompts:
            if p in self.fails:
                raise self.fails.pop(p)
        texts = [reply(p, u) * (10_000 if p.startswith("endless") else 1) for p, u in zip(prompts, used)]
        pieces = [[t[i:i + 3] for i in range(0, len(t), 3)][:params.max_new_tokens] for t in texts]
        step = 0
        while any(step < len(p) for p in pieces):
            if step == 1 and any(p.startswith("endless") for p in prompts):
                assert self.pause.wait(WAIT)
            for row, rows_pieces in enumerate(pieces):
                if cancel.is_set():
                    self.stopped_by_cancel.append(True)
                    return
                if step < len(rows_pieces):
                    yield RowDelta(row, rows_pieces[step])
                    if step == len(rows_pieces) - 1:
                        yield RowDone(row, "eos", len(rows_pieces))
            step += 1
        self.stopped_by_cancel.append(False)


class FakeEngine:
    """The engine's side of the contract: `locked_backend()` holds the model for one batch. Counts the
    batches that have fully ended (restore included), for tests to wait on."""

    def __init__(self, backend: FakeBackend):
        self.backend, self.batches = backend, 0
        self._lock, self._ended = threading.Lock(), threading.Condition()

    @contextmanager
    def locked_backend(self):
        with self._lock:
            try:
                yield self.backend
            finally:
                with self._ended:
                    self.batches += 1
                    self._ended.notify_all()

    model_wanted = False

    def current_backend(self):
        return self.backend

    def wait_batches(self, n: int) -> None:
        with self._ended:
            assert self._ended.wait_for(lambda: self.batches >= n, WAIT), f"{self.batches} batches ended, want {n}"


def make(mixed=True, active=None, merged=False, **kw):
    backend = FakeBackend(mixed, active, merged)
    engine = FakeEngine(backend)
    return Scheduler(engine, window_s=0.001, **kw), engine, backend


def submit_together(sched: Scheduler, backend: FakeBackend, requests: list[tuple], while_waiting=None) -> list:
    """Submit `requests` ((prompt, params, adapters) each) while the worker is busy with a first request, so
    that all of them are waiting when it looks for work again and are taken as one round. `while_waiting`
    gets the handles before the worker is let go."""
    backend.hold_next = True
    first = sched.submit("first", PARAMS)
    assert backend.entered.wait(WAIT)
    handles = [sched.submit(*r) for r in requests]
    if while_waiting:
        while_waiting(handles)
    backend.release.set()
    assert first.text() == reply("first", label(backend.active_adapters))
    return handles


def calls(backend: FakeBackend) -> list[dict]:
    return [c for c in backend.calls if c["prompts"] != ["first"]]


def test_mixed_loader_batches_single_adapters_and_base_together():
    sched, engine, backend = make(mixed=True)
    hot = GenerationParams(temperature=0.8, max_new_tokens=64)
    requests = [
        ("p1", PARAMS, {"A": 1.0}),
        ("p2", PARAMS, {}),                                 # the plain base
        ("p3", PARAMS, UI_STACK),                           # the UI's stack: here the base
        ("p4", GenerationParams(temperature=0, max_new_tokens=64, stop=["zzz"]), {"B": 1.0}),  # stop: same batch
        ("p5", PARAMS, {"A": 0.5, "B": 0.5}),               # a weighted stack: its own batch ...
        ("p6", PARAMS, {"B": 0.5, "A": 0.5}),               # ... shared with the same stack in any order
        ("p7", PARAMS, {"A": 0.5}),                         # one adapter at another weight is a stack too
        ("p8", hot, {"A": 1.0}),                            # other sampling settings: another batch
    ]
    handles = submit_together(sched, backend, requests)
    texts = [h.text() for h in handles]
    engine.wait_batches(2)

    used = ["A", "base", "base", "B", "A*0.5+B*0.5", "A*0.5+B*0.5", "A*0.5", "A"]
    assert texts == [reply(p, u) for (p, _, _), u in zip(requests, used)]
    # a mixed batch names each row's adapter (the active stack does not matter to it); a stack batch runs
    # with its stack set
    got = sorted((tuple(c["prompts"]), c["adapter_names"] and tuple(c["adapter_names"]),
                  "-" if c["adapter_names"] else label(c["active"]), c["params"].temperature) for c in calls(backend))
    assert got == sorted([
        (("p1", "p2", "p3", "p4"), ("A", None, None, "B"), "-", 0),
        (("p5", "p6"), None, "A*0.5+B*0.5", 0),
        (("p7",), None, "A*0.5", 0),
        (("p8",), ("A",), "-", 0.8),
    ])
    assert backend.active_adapters == {} and not backend.merged


def test_loader_without_mixed_batches_runs_each_stack_with_it_set():
    sched, engine, backend = make(mixed=False, active={"B": 1.0})
    requests = [("p1", PARAMS, UI_STACK), ("p2", PARAMS, {"A": 1.0}), ("p3", PARAMS, {}), ("p4", PARAMS, {"A": 1.0})]
    handles = submit_together(sched, backend, requests)
    texts = [h.text() for h in handles]
    engine.wait_batches(2)

    assert texts == [reply("p1", "B"), reply("p2", "A"), reply("p3", "base"), reply("p4", "A")]
    # one batch per stack, each run with its stack active (set just before it), the UI's last
    got = sorted((tuple(c["prompts"]), c["adapter_names"], label(c["active"])) for c in calls(backend))
    assert got == [(("p1",), None, "B"), (("p2", "p4"), None, "A"), (("p3",), None, "base")]
    assert ("set", {"A": 1.0}) in backend.log and ("set", {}) in backend.log
    assert backend.log[-1] == ("set", {"B": 1.0}) and backend.active_adapters == {"B": 1.0}


def test_max_batch_splits_a_group():
    sched, engine, backend = make(mixed=True, max_batch=2)
    handles = submit_together(sched, backend, [(f"p{i}", PARAMS, {"A": 1.0}) for i in range(3)])
    assert [h.text() for h in handles] == [reply(f"p{i}", "A") for i in range(3)]
    assert [c["prompts"] for c in calls(backend)] == [["p0", "p1"], ["p2"]]


def test_stop_strings_apply_per_request():
    sched, engine, backend = make(mixed=True)
    full = reply("p", "base")
    stop = "two"  # starts inside one 3-character delta and ends in the next: held back, then cut
    requests = [("p", GenerationParams(temperature=0, max_new_tokens=64, stop=[stop]), {}),
                ("p", PARAMS, {}),
                ("p", GenerationParams(temperature=0, max_new_tokens=64, stop=["never", "five"]), {})]
    handles = submit_together(sched, backend, requests)
    texts = [h.text() for h in handles]
    assert len(calls(backend)) == 1  # stop strings do not split a batch
    assert texts == [full[:full.index(stop)], full, full[:full.index("five")]]
    assert [h.finish_reason for h in handles] == ["stop", "eos", "stop"]
    assert handles[1].completion_tokens == len(range(0, len(full), 3))


def test_a_whole_reply_wakes_its_reader_once():
    """`JobHandle.text()` (a non-streamed reply) gets the deltas queued before it was called, then the rest in
    one piece with the end: its thread is not woken for every token while the batch computes."""
    job = Job("p", PARAMS, {})
    job.emit(Delta("one "))
    job.whole = True  # what text() sets, here before the rest arrives
    for piece in ("two ", "three ", "four"):
        job.emit(Delta(piece))
    assert job.events.qsize() == 1
    job.emit(Done("length", 4))
    assert [type(e) for e in list(job.events.queue)] == [Delta, Delta, Done]
    handle = JobHandle(job)
    assert handle.text() == "one two three four" and handle.finish_reason == "length"
    streamed = Job("p", PARAMS, {})
    for piece in ("a", "b"):
        streamed.emit(Delta(piece))
    assert streamed.events.qsize() == 2  # a streamed reply still gets every delta as it comes


def test_request_closed_before_its_batch_is_cancelled():
    sched, engine, backend = make(mixed=True)
    closed, listening = submit_together(sched, backend, [("closed", PARAMS, {"A": 1.0}),
                                                         ("listening", PARAMS, {"A": 1.0})],
                                        while_waiting=lambda handles: handles[0].close())
    assert listening.text() == reply("listening", "A")
    assert closed.text() == "" and closed.finish_reason == "cancelled"
    assert [c["prompts"] for c in calls(backend)] == [["listening"]]  # never generated


def test_batch_stops_when_nobody_listens():
    sched, engine, backend = make(mixed=True)
    handle = sched.submit("endless 1", GenerationParams(temperature=0, max_new_tokens=8192), {"A": 1.0})
    deltas = iter(handle)
    assert next(deltas) == reply("endless 1", "A")[:3]
    deltas.close()  # leaving the iteration early closes the request
    backend.pause.set()
    engine.wait_batches(1)
    assert backend.calls[-1]["cancel"].is_set()
    assert backend.stopped_by_cancel == [True]  # the generation itself ended early


def test_batch_goes_on_while_one_request_still_listens():
    sched, engine, backend = make(mixed=True)
    params = GenerationParams(temperature=0, max_new_tokens=40)
    leaving, staying = submit_together(sched, backend, [("endless a", params, {"A": 1.0}),
                                                        ("endless b", params, UI_STACK)])
    deltas = iter(leaving)
    assert next(deltas) == reply("endless a", "A")[:3]
    deltas.close()  # closes the request
    backend.pause.set()
    assert staying.text() == (reply("endless b", "base") * 10)[:120]  # 40 deltas of 3 characters
    assert staying.finish_reason == "eos" and leaving.finish_reason is None
    engine.wait_batches(2)
    assert backend.stopped_by_cancel[-1] is False  # the batch ran to its end


@pytest.mark.parametrize("fails", [False, True])
def test_ui_stack_and_merge_are_restored_after_a_batch(fails):
    sched, engine, backend = make(mixed=True, active={"A": 1.0}, merged=True)
    if fails:
        backend.fails["p"] = RuntimeError("kernel exploded")
    handle = sched.submit("p", PARAMS, {"A": 0.5, "B": 0.5})
    if fails:
        with pytest.raises(RuntimeError, match="kernel exploded"):
            handle.text()
    else:
        assert handle.text() == reply("p", "A*0.5+B*0.5")
    engine.wait_batches(1)
    assert backend.calls[0]["active"] == {"A": 0.5, "B": 0.5}
    assert backend.log[-2:] == [("set", {"A": 1.0}), ("merge",)]
    assert backend.active_adapters == {"A": 1.0} and backend.merged


@pytest.mark.parametrize("error", [RuntimeError("out of memory"), KeyError("no such row")])
def test_failing_batch_reaches_every_request_and_the_worker_survives(error):
    sched, engine, backend = make(mixed=True)
    backend.fails["p1"] = error  # a RuntimeError, or a bug (KeyError)
    handles = submit_together(sched, backend, [("p1", PARAMS, {"A": 1.0}), ("p2", PARAMS, {})])
    for h in handles:
        with pytest.raises(type(error)) as raised:
            h.text()
        assert raised.value is error
    engine.wait_batches(2)
    assert sched.submit("after", PARAMS, {"B": 1.0}).text() == reply("after", "B")
    assert backend.active_adapters == {}
