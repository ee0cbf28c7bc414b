"""Adapter benchmarks on the transformers loader with the embedded SmolLM2-135M-Instruct:

- hot_swap_vs_reload.transformers: switching the active adapter (A→B, both cached) vs reloading the base;
- decode_unmerged_vs_base.transformers: decode tokens/s with one unmerged adapter vs the plain base;
- decode_merged_vs_base.transformers: decode tokens/s with that adapter merged vs the plain base.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from bench.common import Row, hot_swap_vs_reload, side_by_side, timed, write_ab_adapters
from webui.backends import embedded
from webui.engine import Engine
from webui.options.config import GenerationParams, ModelSpec

MESSAGES = [{"role": "user", "content": "Write a short story about a lighthouse keeper."}]
ROWS = ("hot_swap_vs_reload.transformers", "decode_unmerged_vs_base.transformers",
        "decode_merged_vs_base.transformers")



def run(models_dir: Path, quick: bool = False, only: set | None = None) -> list[Row]:
    # A generation of 24 tokens takes about a second here, and one slowed by another process moves a median
    # of three by 10% or more (measured): five, alternated, keep the quick ratios steadier.
    reps = 5 if quick else 7
    tokens = 24 if quick else 64
    base = embedded.ensure_transformers_folder(models_dir)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        loras = Path(tmp)
        write_ab_adapters(base, loras)
        engine = Engine(models_dir, loras)
        spec = ModelSpec(model=base.name, loader="transformers")
        engine.load(spec)
        engine.set_adapters({"A": 1.0})
        engine.set_adapters({"B": 1.0})  # both cached now

        if not only or ROWS[0] in only:
            ours, ref = hot_swap_vs_reload(engine, models_dir, loras, spec, reps)
            rows.append(Row(ROWS[0], ours, ref, "s", False, "switch A→B (cached) vs reload the base"))
            engine.set_adapters({"B": 1.0})

        params = GenerationParams(temperature=0, max_new_tokens=tokens)
        prompt = engine.chat_prompt(MESSAGES)

        def tps(active: dict, merged: bool = False):
            def measure():
                engine.set_adapters(active)
                if merged:
                    engine.merge_adapters()
                seconds = timed(lambda: state_out.__setitem__("text", engine.generate(prompt, params)))
                n = engine.count_tokens(state_out["text"])
                if merged:
                    engine.unmerge_adapters()
                return n / seconds
            return measure

        state_out = {}
        if not only or ROWS[1] in only:
            ours, ref = side_by_side(tps({"A": 1.0}), tps({}), reps)
            rows.append(Row(ROWS[1], ours, ref, "tokens/s", True, f"{tokens} new tokens, greedy, one r=16 adapter"))
        if not only or ROWS[2] in only:
            ours, ref = side_by_side(tps({"A": 1.0}, merged=True), tps({}), reps)
            rows.append(Row(ROWS[2], ours, ref, "tokens/s", True, f"{tokens} new tokens, greedy, adapter merged"))
    return rows
