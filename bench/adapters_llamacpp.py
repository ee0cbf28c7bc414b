"""Adapter benchmarks on the llama.cpp loader with the embedded SmolLM2-135M-Instruct (its Q4_1 GGUF):

- hot_swap_vs_reload.llamacpp: switching the active adapter (A→B, both already converted and loaded)
  vs reloading the base GGUF;
- decode_unmerged_vs_base.llamacpp: decode tokens/s with one runtime LoRA (r=16, q/k/v/o) vs the base;
- engine_vs_direct.llamacpp: tokens/s through our Engine (sampler set-up, stop-string filter, incremental
  UTF-8 decoding) vs calling llama-cpp-python's create_completion directly on the same GGUF with the same
  prompt tokens;
- api_vs_direct.llamacpp: the same completion through the real HTTP server's /v1/completions (uvicorn on a
  loopback port, httpx client) vs llama-cpp-python directly.
"""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from bench.common import Row, hot_swap_vs_reload, side_by_side, timed, write_ab_adapters
from webui.backends import embedded
from webui.engine import Engine
from webui.options.config import GenerationParams, ModelSpec

MESSAGES = [{"role": "user", "content": "Write a short story about a lighthouse keeper."}]
ROWS = ("hot_swap_vs_reload.llamacpp", "decode_unmerged_vs_base.llamacpp", "engine_vs_direct.llamacpp",
        "api_vs_direct.llamacpp")



def run(models_dir: Path, quick: bool = False, only: set | None = None) -> list[Row]:
    reps = 3 if quick else 7
    tokens = 24 if quick else 64
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        loras = Path(tmp)
        # PEFT needs the transformers copy of the embedded model to build the adapters
        write_ab_adapters(embedded.ensure_transformers_folder(models_dir), loras)
        spec = ModelSpec(loader="llamacpp")  # the embedded GGUF
        engine = Engine(models_dir, loras)
        engine.load(spec)
        engine.set_adapters({"A": 1.0})
        engine.set_adapters({"B": 1.0})  # both converted (cached beside the adapter) and loaded now
        params = GenerationParams(temperature=0, max_new_tokens=tokens)
        prompt = engine.chat_prompt(MESSAGES)

        if not only or ROWS[0] in only:
            ours, ref = hot_swap_vs_reload(engine, models_dir, loras, spec, reps)
            rows.append(Row(ROWS[0], ours, ref, "s", False, "switch A→B (loaded) vs reload the base GGUF"))

        out = {}

        def tps(active: dict):
            def measure():
                engine.set_adapters(active)
                seconds = timed(lambda: out.__setitem__("text", engine.generate(prompt, params)))
                return engine.count_tokens(out["text"]) / seconds
            return measure

        if not only or ROWS[1] in only:
            ours, ref = side_by_side(tps({"A": 1.0}), tps({}), reps)
            rows.append(Row(ROWS[1], ours, ref, "tokens/s", True, f"{tokens} new tokens, greedy, one r=16 LoRA"))

        if not only or ROWS[2] in only or ROWS[3] in only:
            import llama_cpp

            engine.set_adapters({})
            direct = llama_cpp.Llama(str(embedded.gguf_path()), n_ctx=spec.n_ctx, n_threads=os.cpu_count(),
                                     n_gpu_layers=spec.n_gpu_layers, verbose=False)
            prompt_tokens = engine._backend.tokenize(prompt)  # the same tokens on both sides

            def direct_tps():
                seconds = timed(lambda: out.__setitem__("direct", direct.create_completion(
                    prompt_tokens, max_tokens=tokens, temperature=0)["choices"][0]["text"]))
                return engine.count_tokens(out["direct"]) / seconds

            if not only or ROWS[2] in only:
                ours, ref = side_by_side(tps({}), direct_tps, reps)
                rows.append(Row(ROWS[2], ours, ref, "tokens/s", True,
                                f"{tokens} new tokens, greedy, Engine.generate vs llama-cpp-python create_completion"))
            if not only or ROWS[3] in only:
                import httpx

                from bench.api_transformers import _server

                url, server = _server(engine)
                body = {"model": "", "prompt": prompt, "max_tokens": tokens, "temperature": 0}

                def via_api():
                    start = time.perf_counter()
                    r = httpx.post(url + "/v1/completions", json=body, timeout=300).json()
                    return r["usage"]["completion_tokens"] / (time.perf_counter() - start)

                ours, ref = side_by_side(via_api, direct_tps, reps)
                server.should_exit = True
                rows.append(Row(ROWS[3], ours, ref, "tokens/s", True,
                                f"{tokens} new tokens, greedy, /v1/completions vs llama-cpp-python create_completion"))
            direct.close()
        engine.unload()
    return rows
