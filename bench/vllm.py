"""Serving speed against real vLLM (its CPU build, scripts/install-vllm.sh; the rows are skipped when it is not
installed), on the embedded SmolLM2-135M-Instruct's transformers folder with three r=8 PEFT adapters:

- vllm_cpu_vs_ours.transformers: 8 concurrent chats over base and the three adapters (two requests each), our
  transformers loader's /v1 vs vLLM's own API, same folder, same adapters (vLLM started with them);
- remote_vs_direct.vllm: the same 8 chats through a LoRA Deck in front of that vLLM (`--loader remote`, which
  registers the adapters at run time) vs straight to vLLM.

Threads are set the same way on both sides: vLLM's CPU build binds one OpenMP thread to a core and keeps the
other for its scheduler and API server; our app runs with OMP_NUM_THREADS=1 likewise (the fact in DESIGN: two
OpenMP threads on 2 cores under load spin into a collapse). vLLM is started as its CPU docs advise (float32 on a
CPU without bf16 instructions, --enforce-eager, Intel OpenMP preloaded, prefix caching off so that rounds do not
reuse each other's prompts). Each row: generated tokens/s, the median of several rounds, side by side.
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import Row, side_by_side, together
from bench.remote import ROOT, _app, _start, _stop
from webui.backends import embedded

ROWS = ("vllm_cpu_vs_ours.transformers", "remote_vs_direct.vllm")
NAMES = ["L0", "L1", "L2"]
PROMPTS = ["Tell me about the sea.", "Name three fruits.", "What is a LoRA adapter?", "Write a haiku about rain.",
           "Why is the sky blue?", "Describe a cat.", "What is 12 times 7?", "Give me a tip for sleeping well."]


def _vllm_python() -> str | None:
    r = subprocess.run(["bash", str(ROOT / "scripts" / "install-vllm.sh"), "--check"], capture_output=True,
                       text=True, check=False)
    return r.stdout.strip().splitlines()[-1] if r.returncode == 0 else None


def _bodies(tokens: int, base: str) -> list[dict]:
    models = [base, *NAMES] * 2  # 8 chats: base and each adapter twice
    # ignore_eos: every request generates exactly `tokens` tokens on both sides (both APIs take it)
    return [{"model": m, "messages": [{"role": "user", "content": p}], "temperature": 0, "max_tokens": tokens,
             "ignore_eos": True} for m, p in zip(models, PROMPTS)]


def run(models_dir: Path, quick: bool = False, only: set | None = None) -> list[Row]:
    from webui.testing.tiny_models import write_adapter

    python = _vllm_python()
    if python is None:
        print("vllm rows skipped: vLLM's CPU build is not installed (bash scripts/install-vllm.sh)", file=sys.stderr)
        return []
    reps = 3 if quick else 7
    tokens = 32 if quick else 64
    folder = embedded.ensure_transformers_folder(models_dir)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        loras = Path(tmp)
        for i, n in enumerate(NAMES):
            write_adapter(folder, loras / n, target_modules=["q_proj", "v_proj"], r=8, alpha=8, seed=i)
        iomp = Path(python).parent.parent / "lib" / "libiomp5.so"
        env = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
               **({"LD_PRELOAD": str(iomp)} if iomp.is_file() else {})}
        # --max-loras: the three adapters plus an empty slot (vLLM's CPU build gives base rows the last slot)
        args = lambda port: [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder),
                             "--served-model-name", folder.name, "--host", "127.0.0.1", "--port", str(port),
                             "--dtype", "float32", "--max-model-len", "2048", "--enforce-eager",
                             "--no-enable-prefix-caching", "--enable-lora", "--max-lora-rank", "16",
                             "--max-loras", str(len(NAMES) + 1),
                             "--lora-modules", *(f"{n}={loras / n}" for n in NAMES)]
        server = front = ours = None
        try:
            server, url = _start(args, env=env, timeout=900)
            direct = _bodies(tokens, folder.name)
            together(url, "/v1/chat/completions", direct)  # warm-up
            one = {"OMP_NUM_THREADS": "1"}  # as vLLM: one OpenMP thread
            if not only or ROWS[0] in only:
                ours, ours_url = _app("--loader", "transformers", "--model", str(folder),
                                        "--loras-dir", str(loras), env=one)
                through = _bodies(tokens, folder.name)
                together(ours_url, "/v1/chat/completions", through)  # warm-up: adapters loaded
                a, b = side_by_side(lambda: together(ours_url, "/v1/chat/completions", through),
                                    lambda: together(url, "/v1/chat/completions", direct), reps)
                rows.append(Row(ROWS[0], a, b, "tokens/s", True,
                                f"8 concurrent chats × {tokens} tokens (base and 3 r=8 adapters, 2 each), SmolLM2-135M "
                                "float32; our transformers loader vs vLLM CPU 0.32.0, one OpenMP thread each"))
                _stop(ours)
                ours = None
            if not only or ROWS[1] in only:
                front, front_url = _app("--loader", "remote", "--model", url, "--loras-dir", str(loras), env=one)
                through = _bodies(tokens, folder.name)
                together(front_url, "/v1/chat/completions", through)  # warm-up: the front checks each adapter
                a, b = side_by_side(lambda: together(front_url, "/v1/chat/completions", through),
                                    lambda: together(url, "/v1/chat/completions", direct), reps)
                rows.append(Row(ROWS[1], a, b, "tokens/s", True,
                                f"8 concurrent chats × {tokens} tokens (base and 3 r=8 adapters) through LoRA Deck's "
                                "remote loader vs straight to vLLM CPU 0.32.0"))
        finally:
            _stop(ours, front, server)
    return rows
