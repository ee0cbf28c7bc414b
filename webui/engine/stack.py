"""The adapter stack a request runs with, typed: `AdapterStack` ({name: weight}, {} = the plain base, weights
checked finite when it is made) and `UI_STACK`, the explicit "whatever stack is active in the UI when the request
runs" (the Model tab's ticks, `--lora`), which used to travel as a bare None. Requests carry one or the other
from the API dialects, the Chat tab and evaluation through `Engine.submit` into the scheduler; loaders take the
stack as the plain dict it also is."""
from __future__ import annotations

from collections.abc import Mapping

from webui.errors import BadInput


def check_weights(weights: Mapping) -> None:
    """Adapter weights must be finite numbers (a NaN would poison every output silently)."""
    for n, w in weights.items():
        if not isinstance(w, (int, float)) or isinstance(w, bool) or w != w or w in (float("inf"), float("-inf")):
            raise BadInput(f"weight of {n} must be a finite number, got {w!r}")


class AdapterStack(dict):
    """{adapter name: weight}, the adapters a request runs with ({} = the plain base). A dict, so that every
    loader takes it as it takes any stack; made only from finite weights."""

    def __init__(self, weights: Mapping[str, float] = (), /):
        super().__init__(weights)
        check_weights(self)

    @property
    def single(self) -> bool:
        """The plain base or one adapter at weight 1: what a mixed batch gives a row of its own."""
        return len(self) == 0 or (len(self) == 1 and next(iter(self.values())) == 1.0)

    def describe(self) -> str:
        return ", ".join(f"{n} × {w:g}" for n, w in self.items()) or "no adapter"


class _UiStack:
    """The stack active in the UI when the request runs (one value: `UI_STACK`)."""

    _instance = None

    def __new__(cls):
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UI_STACK"


UI_STACK = _UiStack()
Stack = AdapterStack | _UiStack  # what a request names


def stack_of(adapters: Mapping[str, float] | _UiStack) -> Stack:
    """A request's stack from what a caller gives: UI_STACK as it is, any mapping checked into an AdapterStack."""
    if adapters is UI_STACK:
        return UI_STACK
    if not isinstance(adapters, Mapping):
        raise TypeError(f"a stack is a {{name: weight}} mapping or UI_STACK, not {adapters!r}")
    return adapters if isinstance(adapters, AdapterStack) else AdapterStack(adapters)
