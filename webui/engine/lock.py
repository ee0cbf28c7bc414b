"""The lock around the Engine's model, which also tells whether a thread waits for it (the scheduler's admission
rule) and whether the model is working now (the LoRA panel's watch)."""
from __future__ import annotations

import threading


class ModelLock:
    """The Engine's lock around the model, which also tells whether a thread waits for it: the scheduler admits
    no new request into its running batch while one does, so a load or an adapter change gets the model as
    soon as the requests already running end, instead of never under a steady stream of requests. A plain
    Lock underneath, not an RLock: a streaming generator may be resumed on a different thread (Gradio runs
    each step in a worker pool), and only a plain Lock may be released by another thread."""

    def __init__(self):
        self._lock, self._count = threading.Lock(), threading.Lock()
        self._waiting = 0

    @property
    def wanted(self) -> bool:
        return self._waiting > 0

    @property
    def held(self) -> bool:
        return self._lock.locked()

    def __enter__(self):
        if self._lock.acquire(blocking=False):
            return self
        with self._count:
            self._waiting += 1
        try:
            self._lock.acquire()
        finally:
            with self._count:
                self._waiting -= 1
        return self

    def __exit__(self, *exc) -> None:
        self._lock.release()
