"""API and batching benchmarks on the transformers loader with the embedded SmolLM2-135M-Instruct:

- mixed_batch_vs_sequential.transformers: 4 requests for 4 different adapters submitted together (one
  mixed batch through the scheduler) vs the same 4 one after another; generated tokens/s.
- api_vs_direct.transformers: tokens/s of a completion through the real HTTP server's /v1 (uvicorn on a
  loopback port, httpx client) vs `Engine.generate` in the same process (the same door, Engine.submit, without HTTP).
"""
from __future__ import annotations

import socket
import tempfile
import threading
import time
from pathlib import Path

from bench.common import Row, side_by_side, timed
from webui.backends import embedded
from webui.engine import Engine
from webui.options.config import GenerationParams, ModelSpec, ServerConfig

ROWS = ("mixed_batch_vs_sequential.transformers", "api_vs_direct.transformers")
PROMPTS = ["Tell me about the sea.", "Name three fruits.", "What is a LoRA adapter?", "Write a haiku about rain."]


def _server(engine: Engine) -> tuple[str, object]:
    import uvicorn

    from webui.web.server import build_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(build_app(engine, ServerConfig(nowebui=True)), host="127.0.0.1",
                                           port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}", server


def run(models_dir: Path, quick: bool = False, only: set | None = None) -> list[Row]:
    import httpx

    from webui.testing.tiny_models import write_adapter

    reps = 3 if quick else 5
    tokens = 24 if quick else 48
    base = embedded.ensure_transformers_folder(models_dir)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        loras = Path(tmp)
        names = [f"L{i}" for i in range(4)]
        for i, n in enumerate(names):
            write_adapter(base, loras / n, target_modules=["q_proj", "v_proj"], r=8, alpha=8, seed=i)
        engine = Engine(models_dir, loras)
        engine.load(ModelSpec(model=base.name, loader="transformers"))
        engine.prepare_adapters(names)
        params = GenerationParams(temperature=0, max_new_tokens=tokens)
        prompts = [engine.chat_prompt([{"role": "user", "content": p}]) for p in PROMPTS]

        if not only or ROWS[0] in only:
            def batched():
                handles = [engine.submit(p, params, {n: 1.0}) for p, n in zip(prompts, names)]
                start = time.perf_counter()
                texts = [h.text() for h in handles]
                seconds = time.perf_counter() - start
                return sum(h.completion_tokens or engine.count_tokens(t) for h, t in zip(handles, texts)) / seconds

            def sequential():
                total, seconds = 0, 0.0
                for p, n in zip(prompts, names):
                    start = time.perf_counter()
                    h = engine.submit(p, params, {n: 1.0})
                    t = h.text()
                    seconds += time.perf_counter() - start
                    total += h.completion_tokens or engine.count_tokens(t)
                return total / seconds

            ours, ref = side_by_side(batched, sequential, reps)
            rows.append(Row(ROWS[0], ours, ref, "tokens/s", True,
                            f"4 requests × {tokens} tokens, 4 different r=8 adapters"))

        if not only or ROWS[1] in only:
            url, server = _server(engine)
            body = {"model": "", "prompt": prompts[0], "max_tokens": tokens, "temperature": 0, "adapters": []}

            def via_api():
                start = time.perf_counter()
                r = httpx.post(url + "/v1/completions", json=body, timeout=300).json()
                return r["usage"]["completion_tokens"] / (time.perf_counter() - start)

            def direct():
                seconds = timed(lambda: out.__setitem__("t", engine.generate(prompts[0], params)))
                return engine.count_tokens(out["t"]) / seconds

            out = {}
            ours, ref = side_by_side(via_api, direct, reps)
            server.should_exit = True
            rows.append(Row(ROWS[1], ours, ref, "tokens/s", True, f"one completion of {tokens} tokens, no adapter"))
    return rows
