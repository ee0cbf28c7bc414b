"""GPTQ benchmarks with the embedded SmolLM2-135M-Instruct quantized to 4 bits (group size 64; made once
into models/SmolLM2-135M-Instruct-GPTQ/, a few minutes on CPU the first time):

- hot_swap_vs_reload.gptq: switching the active adapter (A→B, both cached) vs reloading the GPTQ base
  (the note gives the load times: the first one in a process sets up GPTQModel's kernel);
- decode_unmerged_vs_base.gptq: decode tokens/s with one r=16 adapter on the GPTQ base vs the GPTQ base;
- decode_gptq_vs_float.transformers: decode tokens/s of the GPTQ base vs the float model on the
  transformers loader (same prompt, greedy).
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

from bench.adapters_transformers import MESSAGES
from bench.common import Row, hot_swap_vs_reload, side_by_side, timed, write_ab_adapters
from webui.backends import embedded
from webui.backends.embedded import ensure_gptq_folder
from webui.engine import Engine
from webui.options.config import GenerationParams, ModelSpec

ROWS = ("hot_swap_vs_reload.gptq", "decode_unmerged_vs_base.gptq", "decode_gptq_vs_float.transformers")


def _tokens_per_s(engine: Engine, prompt: str, params: GenerationParams, active: dict):
    def measure():
        engine.set_adapters(active)
        out = {}
        seconds = timed(lambda: out.__setitem__("text", engine.generate(prompt, params)))
        return engine.count_tokens(out["text"]) / seconds
    return measure


def run(models_dir: Path, quick: bool = False, only: set | None = None) -> list[Row]:
    # A generation of 24 tokens takes about a second here, and one slowed by another process moves a median
    # of three by 10% or more (measured): five, alternated, keep the quick ratios steadier.
    reps = 5 if quick else 7
    tokens = 24 if quick else 64
    float_folder = embedded.ensure_transformers_folder(models_dir)
    gptq_folder = ensure_gptq_folder(models_dir)
    spec = ModelSpec(model=gptq_folder.name, loader="gptq")
    params = GenerationParams(temperature=0, max_new_tokens=tokens)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        loras = Path(tmp)
        write_ab_adapters(float_folder, loras)  # written against the float model: same layers and shapes
        engine = Engine(models_dir, loras)
        start = time.perf_counter()
        engine.load(spec)
        first_load = time.perf_counter() - start
        engine.set_adapters({"A": 1.0})
        engine.set_adapters({"B": 1.0})  # both cached now
        prompt = engine.chat_prompt(MESSAGES)

        if not only or ROWS[0] in only:
            ours, ref = hot_swap_vs_reload(engine, models_dir, loras, spec, reps)
            rows.append(Row(ROWS[0], ours, ref, "s", False, f"switch A→B (cached) vs reload the GPTQ base; GPTQ "
                            f"load {ref:.2f} s (first in the process, kernel set-up included: {first_load:.1f} s)"))
        if not only or ROWS[1] in only:
            ours, ref = side_by_side(_tokens_per_s(engine, prompt, params, {"A": 1.0}),
                                     _tokens_per_s(engine, prompt, params, {}), reps)
            rows.append(Row(ROWS[1], ours, ref, "tokens/s", True,
                            f"{tokens} new tokens, greedy, one r=16 adapter on the 4-bit base"))
        if not only or ROWS[2] in only:
            engine.set_adapters({})
            floats = Engine(models_dir, loras)
            floats.load(ModelSpec(model=float_folder.name, loader="transformers"))
            ours, ref = side_by_side(_tokens_per_s(engine, prompt, params, {}),
                                     _tokens_per_s(floats, prompt, params, {}), reps)
            floats.unload()
            rows.append(Row(ROWS[2], ours, ref, "tokens/s", True, f"{tokens} new tokens, greedy: GPTQ 4-bit "
                            f"(group 64, {engine.capabilities.extra['kernels'][0]}) vs float ({engine.loaded.device})"))
        engine.unload()
    return rows
