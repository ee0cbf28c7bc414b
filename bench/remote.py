"""The remote loader's cost: a LoRA Deck in front of a serving engine vs the same requests sent straight to it,
on the embedded SmolLM2-135M-Instruct GGUF with four r=8 adapters:

- remote_vs_direct.loradeck: the engine is a second LoRA Deck (`--nowebui`, llama.cpp loader);
- remote_vs_direct.llama-server: the engine is llama.cpp's llama-server (scripts/build-llama-server.sh; the row
  is skipped when it is not built) started with our GGUF LoRA conversions, selected per request (`lora`).

Each row: generated tokens/s of 4 concurrent chat requests, each for a different adapter, through the front's
/v1 vs straight to the engine (side by side, the median of several rounds). The note gives the added latency
per request: the median time of a one-token chat through the front minus straight to the engine.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench.common import Row, posted_tokens, side_by_side, timed, together
from webui.backends import embedded

ROWS = ("remote_vs_direct.loradeck", "remote_vs_direct.llama-server")
PROMPTS = ["Tell me about the sea.", "Name three fruits.", "What is a LoRA adapter?", "Write a haiku about rain."]
NAMES = [f"L{i}" for i in range(4)]
ROOT = Path(__file__).resolve().parent.parent


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(args, env: dict | None = None, timeout: float = 300) -> tuple[subprocess.Popen, str]:
    """A server process (`args(port)`: its command line) on a free loopback port, once /health answers."""
    port = _port()
    args = args(port)
    # a session of its own: vLLM starts an engine process beside its server, and _stop ends both
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, **(env or {})}, start_new_session=True)
    url, deadline = f"http://127.0.0.1:{port}", time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{args[0]} exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"{args[0]} did not become ready")


def _app(*args: str, env: dict | None = None) -> tuple[subprocess.Popen, str]:
    return _start(lambda port: [sys.executable, str(ROOT / "app.py"), "--nowebui", *args, "--port", str(port)], env)


def _chat(url: str, body: dict) -> int:
    return posted_tokens(url, "/v1/chat/completions", body)


def _concurrent(url: str, bodies: list[dict]) -> float:
    return together(url, "/v1/chat/completions", bodies)


def _measure(name: str, front: str, engine: str, front_body, engine_body, tokens: int, reps: int) -> Row:
    def bodies(make, max_tokens):
        return [{**make(i), "messages": [{"role": "user", "content": PROMPTS[i]}], "temperature": 0,
                 "max_tokens": max_tokens} for i in range(len(NAMES))]

    through, direct = bodies(front_body, tokens), bodies(engine_body, tokens)
    _concurrent(front, through)  # warm both paths (adapter conversions, connection pools)
    _concurrent(engine, direct)
    ours, ref = side_by_side(lambda: _concurrent(front, through), lambda: _concurrent(engine, direct), reps)
    one_front, one_engine = bodies(front_body, 1)[0], bodies(engine_body, 1)[0]
    lat_front, lat_engine = side_by_side(lambda: timed(lambda: _chat(front, one_front)),
                                         lambda: timed(lambda: _chat(engine, one_engine)), max(reps, 5))
    return Row(name, ours, ref, "tokens/s", True,
               f"4 concurrent chats × {tokens} tokens, 4 different r=8 adapters; added latency per request "
               f"{(lat_front - lat_engine) * 1000:.1f} ms (one-token chat: {lat_front * 1000:.0f} ms through the "
               f"front vs {lat_engine * 1000:.0f} ms direct)")


def _stop(*procs) -> None:
    for p in procs:
        if p is not None and p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(30)


def run(models_dir: Path, quick: bool = False, only: set | None = None) -> list[Row]:
    from webui.testing.tiny_models import write_adapter

    reps = 5 if quick else 9  # several rounds: the figures move with whatever else the machine runs
    tokens = 32 if quick else 64
    base = embedded.ensure_transformers_folder(models_dir)  # PEFT builds the adapters on the float copy
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        loras = Path(tmp)
        for i, n in enumerate(NAMES):
            write_adapter(base, loras / n, target_modules=["q_proj", "v_proj"], r=8, alpha=8, seed=i)

        if not only or ROWS[0] in only:
            engine = front = None
            try:
                engine, engine_url = _app("--loader", "llamacpp", "--models-dir", str(models_dir),
                                          "--loras-dir", str(loras))
                front, front_url = _app("--loader", "remote", "--model", engine_url, "--loras-dir", str(loras))
                rows.append(_measure(ROWS[0], front_url, engine_url, lambda i: {"model": NAMES[i]},
                                     lambda i: {"model": NAMES[i]}, tokens, reps))
            finally:
                _stop(front, engine)

        if not only or ROWS[1] in only:
            binary = subprocess.run(["bash", str(ROOT / "scripts" / "build-llama-server.sh"), "--check"],
                                    check=False, capture_output=True, text=True)
            if binary.returncode != 0:
                print("remote_vs_direct.llama-server skipped: llama-server is not built "
                      "(bash scripts/build-llama-server.sh builds it in about 10 minutes)", file=sys.stderr)
                return rows
            from webui.backends.llamacpp.server_cmd import command, convert_for_llama_server

            path = binary.stdout.strip().splitlines()[-1]
            converted = convert_for_llama_server(embedded.gguf_path(), [loras / n for n in NAMES])
            # 4 slots: the 4 concurrent requests are batched by the engine, as a serving set-up would be
            args = lambda port: command(path, embedded.gguf_path(), converted, port,
                                        extra=("--parallel", "4", "-c", "4096", "--no-webui"))
            server = front = None
            try:
                server, server_url = _start(args, env={"LD_LIBRARY_PATH": os.path.dirname(path)})
                front, front_url = _app("--loader", "remote", "--remote-engine", "llama-server", "--model",
                                        server_url, "--loras-dir", str(loras))

                def direct(i: int) -> dict:
                    return {"lora": [{"id": j, "scale": 1.0 if j == i else 0.0} for j in range(len(NAMES))]}

                rows.append(_measure(ROWS[1], front_url, server_url, lambda i: {"model": NAMES[i]}, direct,
                                     tokens, reps))
            finally:
                _stop(front, server)
    return rows
