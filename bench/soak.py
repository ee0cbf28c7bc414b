"""Soak benchmark: the reliability soak (tests/reliability/soak.py) run long — 8 API clients asking for mixed
adapters in every dialect while another client swaps, merges, unmerges and loads adapters — on the tiny test
Llama (the soak checks correctness under concurrency, not speed: a tiny model runs more requests a minute).

- soak: ours = answers equal to plain PEFT's greedy text, reference = requests sent (ratio 1 = every answer
  right); the note has requests, clients, adapters, swaps, errors, wrong answers and RSS growth.
"""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from bench.common import Row

ROWS = ("soak",)


def run(models_dir: Path, quick: bool = False, only: set | None = None) -> list[Row]:
    from tests.reliability.soak import run_soak, write_adapters
    from webui.testing.tiny_models import build_tokenizer, write_model

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request would bury the table
    clients, requests = 8, (10 if quick else 60)
    with tempfile.TemporaryDirectory() as tmp:
        base = write_model("llama", Path(tmp) / "models", build_tokenizer())
        loras = write_adapters(base, Path(tmp) / "loras")
        result = run_soak(base, loras, clients=clients, requests=requests, max_tokens=16)
    sent = clients * requests
    print(result.summary())
    for problem in result.problems[:10]:
        print("  ", problem)
    return [Row("soak", result.requests - result.wrong, sent, "requests", True, result.summary())]
