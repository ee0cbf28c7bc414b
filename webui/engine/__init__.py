"""The Engine and its private parts: `engine.py` (the one stateful object: the loaded model, its adapters and
the one door for generation, `Engine.submit`), `scheduler.py` (how submitted requests share the model:
continuous or static batches), `stack.py` (a request's adapter stack, typed, and UI_STACK) and `stop_strings.py`
(stop strings cut across token boundaries)."""
from .engine import Engine, LoadResult
from .scheduler import JobHandle
from .stack import UI_STACK, AdapterStack, Stack, check_weights

__all__ = ["UI_STACK", "AdapterStack", "Engine", "JobHandle", "LoadResult", "Stack", "check_weights"]
