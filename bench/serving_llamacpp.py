"""Serving on the llama.cpp loader against llama.cpp's own server, on the embedded SmolLM2-135M-Instruct Q4_1
GGUF with four r=8 all-linear LoRAs, the same GGUF LoRA files on both sides (our conversion, cached beside each
PEFT adapter, which our server reuses; llama-server gets them as `--lora a,b,c,d --lora-init-without-apply`,
each request picking its own with `lora`):

- gguf_vs_llama_server.single_base / single_adapter: one request at a time, no adapter / one adapter;
- gguf_vs_llama_server.concurrent4_same / concurrent4_mixed: 4 requests at once, all with the same adapter /
  each with another (llama.cpp applies adapters per context, so neither server batches those together);

each: generated tokens/s through our `/v1/completions` (a real server process, `--loader llamacpp`) vs
llama-server's `/v1/completions`, both with one thread per core (2 where this was written), 4 slots on
llama-server (`--parallel 4 -c 4096`: 1024 tokens of context per slot; ours gives every row the whole n_ctx
4096), greedy, 128 new tokens, the same prompt text; the two alternate, several rounds, medians. Skipped (with a message) when llama-server is not
built (bash scripts/build-llama-server.sh).

- concurrent8_vs_single.llamacpp, ttft_under_load.llamacpp: ours alone, in this process through the scheduler,
  measured as bench/serving.py measures them for the transformers-family loaders (8 closed-loop clients vs one;
  the first token of a request arriving while 7 others decode vs on an idle model).
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import Row, posted_tokens, side_by_side, together
from bench.remote import ROOT, _start, _stop
from webui.backends import embedded

ROWS = ("gguf_vs_llama_server.single_base", "gguf_vs_llama_server.single_adapter",
        "gguf_vs_llama_server.concurrent4_same", "gguf_vs_llama_server.concurrent4_mixed",
        "concurrent8_vs_single.llamacpp", "ttft_under_load.llamacpp")
NAMES = [f"L{i}" for i in range(4)]
THREADS = os.cpu_count()  # ours serves with n_threads 0 = every core; llama-server gets as many (-t)
MESSAGE = "Write a short story about a lighthouse keeper."


def _completion(url: str, body: dict) -> int:
    return posted_tokens(url, "/v1/completions", body)


def _together(url: str, bodies: list[dict]) -> float:
    return together(url, "/v1/completions", bodies)


def _llama_server_binary() -> str | None:
    found = subprocess.run(["bash", str(ROOT / "scripts" / "build-llama-server.sh"), "--check"],
                           check=False, capture_output=True, text=True)
    return found.stdout.strip().splitlines()[-1] if found.returncode == 0 and found.stdout.strip() else None


def _against_llama_server(models_dir: Path, binary: str, names: list[str], quick: bool) -> list[Row]:
    from webui.backends.llamacpp.server_cmd import command, convert_for_llama_server
    from webui.testing.tiny_models import write_adapter

    reps = 3 if quick else 7
    tokens = 32 if quick else 128
    base = embedded.ensure_transformers_folder(models_dir)  # PEFT builds the adapters on the float copy
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        loras = Path(tmp)
        for i, n in enumerate(NAMES):
            write_adapter(base, loras / n, target_modules="all-linear", r=8, alpha=8, seed=i)
        converted = convert_for_llama_server(embedded.gguf_path(), [loras / n for n in NAMES])  # ours reuses these
        ours = server = None
        try:
            ours, ours_url = _start(lambda port: [
                sys.executable, str(ROOT / "app.py"), "--nowebui", "--loader", "llamacpp", "--models-dir",
                str(models_dir), "--loras-dir", str(loras), "--port", str(port)])
            server, server_url = _start(lambda port: command(
                binary, embedded.gguf_path(), converted, port,
                extra=("--parallel", "4", "-c", "4096", "-t", str(THREADS), "--no-webui")),
                env={"LD_LIBRARY_PATH": os.path.dirname(binary)})
            body = {"prompt": _chat_prompt(), "max_tokens": tokens, "temperature": 0}
            for n in NAMES:  # every adapter loaded by ours before anything is timed
                _completion(ours_url, {**body, "model": n, "max_tokens": 1})

            def theirs(i: int | None) -> dict:
                return {**body, "lora": [{"id": j, "scale": 1.0 if j == i else 0.0} for j in range(len(NAMES))]}

            def mine(i: int | None) -> dict:
                return {**body, **({"model": NAMES[i]} if i is not None else {})}

            cases = {ROWS[0]: [None], ROWS[1]: [0], ROWS[2]: [0, 0, 0, 0], ROWS[3]: [0, 1, 2, 3]}
            notes = {ROWS[0]: "one request, no adapter", ROWS[1]: "one request, one r=8 all-linear LoRA",
                     ROWS[2]: "4 concurrent requests, the same LoRA", ROWS[3]: "4 concurrent requests, 4 different LoRAs"}
            for name in names:
                a, b = [mine(i) for i in cases[name]], [theirs(i) for i in cases[name]]
                _together(ours_url, a)  # warm: prompt caches, connection pools
                _together(server_url, b)
                o, r = side_by_side(lambda a=a: _together(ours_url, a), lambda b=b: _together(server_url, b), reps)
                rows.append(Row(name, o, r, "tokens/s", True,
                                f"{notes[name]}, {tokens} greedy tokens, {THREADS} threads; ours /v1/completions vs "
                                f"llama-server /v1/completions (--parallel 4 -c 4096)"))
        finally:
            _stop(ours, server)
    return rows


def run(models_dir: Path, quick: bool = False, only: set | None = None) -> list[Row]:
    wanted = lambda name: not only or name in only
    rows: list[Row] = []
    server_rows = [r for r in ROWS[:4] if wanted(r)]
    binary = _llama_server_binary() if server_rows else None
    if server_rows and binary is None:
        print(f"{', '.join(server_rows)} skipped: llama-server is not built "
              "(bash scripts/build-llama-server.sh builds it in about 10 minutes)", file=sys.stderr)
    elif server_rows:
        rows += _against_llama_server(models_dir, binary, server_rows, quick)
    if wanted(ROWS[4]) or wanted(ROWS[5]):  # in this process, through the scheduler, as for the other loaders
        from bench.serving import rows_for
        from webui.engine import Engine
        from webui.options.config import ModelSpec

        engine = Engine(models_dir, models_dir / "loras")
        engine.load(ModelSpec(loader="llamacpp", n_threads=THREADS))  # the embedded GGUF
        try:
            rows += rows_for(engine, "llamacpp", quick, only)
        finally:
            engine.unload()
    return rows


def _chat_prompt(message: str = MESSAGE) -> str:
    """The embedded model's chat template around `message` (the same text goes to both servers)."""
    import llama_cpp
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    llm = llama_cpp.Llama(str(embedded.gguf_path()), vocab_only=True, verbose=False)
    try:
        vocab = llm._model
        text = lambda t: llm.detokenize([t], special=True).decode() if t >= 0 else ""
        fmt = Jinja2ChatFormatter(llm.metadata["tokenizer.chat_template"], eos_token=text(vocab.token_eos()),
                                  bos_token=text(vocab.token_bos()), add_generation_prompt=True)
        return fmt(messages=[{"role": "user", "content": message}]).prompt
    finally:
        llm.close()


if __name__ == "__main__":  # python -m bench.serving_llamacpp: print the rows (bench/__main__ runs it too)
    for row in run(Path(os.environ.get("MODELS_DIR", "models")), quick="--quick" in sys.argv):
        print(row.to_dict())
