"""Serving under load on the transformers-family loaders, through the real scheduler (continuous batching),
with the embedded SmolLM2-135M-Instruct (float, and its GPTQ 4-bit copy):

- concurrent8_vs_single.<loader>: 8 closed-loop clients (each sends its next request when its last one has
  ended) vs one client: total generated tokens/s;
- ttft_under_load.<loader>: time to the first token of a request that arrives while 7 others are decoding,
  vs the same request on an idle model (lower is better).

`concurrent_vs_single` and `ttft_under_load` are shared with the llama.cpp rows (bench/serving_llamacpp.py).
"""
from __future__ import annotations

import itertools
import threading
import time
from pathlib import Path

from bench.common import Row, side_by_side
from webui.backends import embedded
from webui.engine import Engine
from webui.options.config import GenerationParams, ModelSpec

ROWS = ("concurrent8_vs_single.transformers", "ttft_under_load.transformers",
        "concurrent8_vs_single.gptq", "ttft_under_load.gptq")
PROMPTS = ["Tell me about the sea.", "Name three fruits.", "What is a LoRA adapter?", "Write a haiku about rain.",
           "Why is the sky blue?", "Describe a cat.", "How do bees make honey?", "What is a prime number?"]


def _client(engine: Engine, prompt: str, params: GenerationParams, requests: int, tokens: list) -> None:
    for _ in range(requests):
        handle = engine.submit(prompt, params)
        handle.text()
        tokens.append(handle.completion_tokens or 0)


def concurrent_vs_single(engine: Engine, prompts: list[str], params: GenerationParams, reps: int,
                         clients: int = 8, requests: int = 2) -> tuple[float, float]:
    """(tokens/s of `clients` closed-loop clients, tokens/s of one), medians side by side."""
    def measure(n: int):
        def run() -> float:
            tokens: list[int] = []
            threads = [threading.Thread(target=_client, args=(engine, prompts[i % len(prompts)], params, requests,
                                                               tokens)) for i in range(n)]
            start = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            return sum(tokens) / (time.perf_counter() - start)
        return run

    return side_by_side(measure(clients), measure(1), reps)


def _first_token_seconds(engine: Engine, prompt: str, params: GenerationParams) -> float:
    start = time.perf_counter()
    handle = engine.submit(prompt, params)
    next(iter(handle), None)
    seconds = time.perf_counter() - start
    handle.close()
    return seconds


def ttft_under_load(engine: Engine, prompts: list[str], params: GenerationParams, reps: int,
                    others: int = 7) -> tuple[float, float]:
    """(seconds to the first token of a request arriving while `others` decode, the same on an idle model). The
    probe's prompt is new each time (the same words after a counter), so that neither side finds it in a
    prompt cache (llama.cpp's slots keep finished prompts)."""
    probe = GenerationParams(temperature=0, max_new_tokens=4)
    long = GenerationParams(temperature=0, max_new_tokens=params.max_new_tokens * 4)
    count = itertools.count()

    def fresh() -> str:
        return engine.chat_prompt([{"role": "user", "content": f"Question {next(count)}. {PROMPTS[-1]}"}])

    def loaded() -> float:
        handles = [engine.submit(prompts[i % len(prompts)], long) for i in range(others)]
        streams = [iter(h) for h in handles]
        for s in streams:  # all of them are decoding now
            next(s, None)
        seconds = _first_token_seconds(engine, fresh(), probe)
        for h in handles:
            h.close()
        with engine.locked_backend():  # the batch has drained
            pass
        return seconds

    return side_by_side(loaded, lambda: _first_token_seconds(engine, fresh(), probe), reps)


def rows_for(engine: Engine, loader: str, quick: bool, only: set | None) -> list[Row]:
    reps = 3 if quick else 5
    tokens = 24 if quick else 64
    params = GenerationParams(temperature=0, max_new_tokens=tokens)
    prompts = [engine.chat_prompt([{"role": "user", "content": p}]) for p in PROMPTS]
    rows = []
    name = f"concurrent8_vs_single.{loader}"
    if not only or name in only:
        ours, ref = concurrent_vs_single(engine, prompts, params, reps)
        rows.append(Row(name, ours, ref, "tokens/s", True,
                        f"8 closed-loop clients vs 1, 2 requests each of up to {tokens} tokens, greedy, no adapter"))
    name = f"ttft_under_load.{loader}"
    if not only or name in only:
        ours, ref = ttft_under_load(engine, prompts, params, reps)
        rows.append(Row(name, ours, ref, "s", False, "first token of a request arriving while 7 others decode, "
                                                     "vs on an idle model"))
    return rows


def run(models_dir: Path, quick: bool = False, only: set | None = None) -> list[Row]:
    rows = []
    for loader, folder_of in (("transformers", embedded.ensure_transformers_folder),
                              ("gptq", embedded.ensure_gptq_folder)):
        if only and not any(r.endswith("." + loader) for r in only):
            continue
        engine = Engine(models_dir, models_dir / "loras")
        engine.load(ModelSpec(model=folder_of(models_dir).name, loader=loader))
        rows += rows_for(engine, loader, quick, only)
        engine.unload()
    return rows
