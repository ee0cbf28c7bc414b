"""The Engine and its private parts: `engine.py` (the one stateful object: the loaded model, its adapters and
the one door for generation, `Engine.submit`), `scheduler.py` (how submitted requests share the model:
continuous or static batches) and `stop_strings.py` (stop strings cut across token boundaries)."""
from webui.engine.engine import Engine, LoadResult, check_weights

__all__ = ["Engine", "LoadResult", "check_weights"]
