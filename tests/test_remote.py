"""The remote loader against real engines on loopback ports: a second LoRA Deck (`--nowebui`) driven in its own
dialect and in the vLLM, SGLang and LoRAX dialects it also speaks, and llama.cpp's own `llama-server` (built
from the llama.cpp sources of the llama-cpp-python sdist by scripts/build-llama-server.sh) started with two
GGUF LoRAs made by our converter. Every answer through the front LoRA Deck (its /v1, and its Engine as the
UI uses it) is compared with the same request sent straight to the engine; then concurrency, and the engine
killed mid-stream and restarted."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest

from tests.helpers import ROOT, AppProcess, api_app, streamed_chat, wait_healthy
from webui.options.config import GenerationParams, ModelSpec
from webui.testing.tiny_models import write_adapter

MAX = 12
QUESTION = [{"role": "user", "content": "Name three colors."}]
# the requests compared: plain base, adapter A, adapter B, a weighted stack of both
SELECTIONS = {"base": {"model": "tiny-llama"}, "A": {"model": "A"}, "B": {"model": "B"},
              "stack": {"model": "", "adapters": [{"name": "A", "weight": 0.7}, {"name": "B", "weight": 0.5}]}}


@pytest.fixture(scope="module")
def loras(llama_loras, tmp_path_factory):
    d = tmp_path_factory.mktemp("remote-loras")
    for name in ("A", "B"):
        shutil.copytree(llama_loras / name, d / name)
    return d


@pytest.fixture(scope="module")
def back(tiny_models, loras):
    """The engine: a LoRA Deck serving the API alone."""
    proc = api_app(tiny_models["llama"], loras)
    yield proc
    proc.stop()


def front_app(url: str, loras, *extra: str) -> AppProcess:
    return AppProcess("--loader", "remote", "--model", url, "--loras-dir", str(loras), "--nowebui", *extra).wait_ready()


@pytest.fixture(scope="module")
def front(back, loras):
    proc = front_app(back.url, loras, "--remote-timeout", "20")
    yield proc
    proc.stop()


def chat(url: str, selection: dict, messages=QUESTION, **extra) -> httpx.Response:
    body = {"messages": messages, "temperature": 0, "max_tokens": MAX, **selection, **extra}
    return httpx.post(url + "/v1/chat/completions", json=body, timeout=120)


def answer(url: str, selection: dict, **extra) -> str:
    r = chat(url, selection, **extra)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def streamed(url: str, selection: dict) -> str:
    return streamed_chat(url, {"messages": QUESTION, "temperature": 0, "max_tokens": MAX, **selection})


# -- another LoRA Deck as the engine ---------------------------------------------------------------------
def test_loradeck_engine_answers_equal_direct(back, front):
    direct = {name: answer(back.url, sel) for name, sel in SELECTIONS.items()}
    assert len(set(direct.values())) >= 3, direct  # the adapters change the answer: the comparison means something
    for name, sel in SELECTIONS.items():
        assert answer(front.url, sel) == direct[name], name
    assert streamed(front.url, SELECTIONS["stack"]) == direct["stack"]
    models = httpx.get(front.url + "/v1/models", timeout=30).json()["data"]
    assert models[0]["id"] == "tiny-llama"  # the engine's base, under its own name
    # completions (no chat template) as well
    body = {"prompt": "The quick brown fox", "temperature": 0, "max_tokens": MAX, "model": "B"}
    texts = [httpx.post(u + "/v1/completions", json=body, timeout=120).json()["choices"][0]["text"]
             for u in (back.url, front.url)]
    assert texts[0] == texts[1]


def test_loradeck_engine_through_the_ui_engine(back, loras):
    """The Engine the UI drives, loaded with the remote loader: the active stack (the LoRA panel) and chat."""
    from webui.engine import Engine

    direct = answer(back.url, SELECTIONS["stack"])
    engine = Engine("models", loras)
    engine.load(ModelSpec(model=back.url, loader="remote"))
    try:
        assert engine.capabilities.concurrent and engine.loaded.context_length == 256
        engine.set_adapters({"A": 0.7, "B": 0.5})
        params = GenerationParams(temperature=0, max_new_tokens=MAX)
        assert "".join(engine.stream_chat(QUESTION, params)) == direct
        engine.set_adapters({})
        assert "".join(engine.stream_chat(QUESTION, params)) == answer(back.url, SELECTIONS["base"])
        with pytest.raises(Exception, match="cannot merge"):
            engine.merge_adapters()
    finally:
        engine.unload()


def run_concurrently(url: str, requests: list[dict]) -> list[str]:
    out: list = [None] * len(requests)

    def one(i: int) -> None:
        out[i] = answer(url, requests[i]["selection"], messages=requests[i]["messages"])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    return out


def mixed_requests() -> list[dict]:
    names = ["base", "A", "B", "stack", "A", "B"]
    return [{"selection": SELECTIONS[n], "messages": [{"role": "user", "content": f"Tell me about number {i}."}]}
            for i, n in enumerate(names)]


def test_loradeck_engine_concurrent_mixed_adapters(back, front):
    requests = mixed_requests()
    direct = [answer(back.url, r["selection"], messages=r["messages"]) for r in requests]
    assert run_concurrently(front.url, requests) == direct


def stream_until_killed(front_url: str, kill) -> list[dict]:
    """Stream a long reply through the front and call `kill` once the first text arrived; the events seen."""
    body = {"messages": QUESTION, "temperature": 0, "max_tokens": 200, "stream": True, "model": "A",
            "ignore_eos": True}
    events = []
    with httpx.stream("POST", front_url + "/v1/chat/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                events.append(json.loads(line[6:]))
                if len(events) == 2:
                    kill()
    return events


def test_loradeck_engine_killed_and_restarted(tiny_models, loras, back, front):
    direct = answer(back.url, SELECTIONS["B"])
    events = stream_until_killed(front.url, back.proc.kill)
    back.proc.wait(30)
    errors = [e["error"] for e in events if "error" in e]
    assert errors and "engine" in errors[0]["message"], events[-3:]
    r = chat(front.url, SELECTIONS["B"])  # engine down: a clean 503, the front keeps running
    assert r.status_code == 503, r.text
    assert r.json()["error"]["code"] == "engine_unavailable" and "unreachable" in r.json()["error"]["message"]
    assert httpx.get(front.url + "/health", timeout=30).status_code == 200
    restarted = AppProcess("--model", "tiny-llama", "--models-dir", str(tiny_models["llama"].parent), "--loras-dir",
                           str(loras), "--nowebui", port=back.port).wait_ready()
    back.proc, back.log = restarted.proc, restarted.log  # the module fixture stops the new process
    assert answer(front.url, SELECTIONS["B"]) == direct
    assert answer(front.url, SELECTIONS["stack"]) == answer(back.url, SELECTIONS["stack"])


# -- the vLLM, SGLang and LoRAX dialects, against LoRA Deck's own implementation of them ------------------------
@pytest.mark.parametrize("engine", ["vllm", "sglang", "lorax"])
def test_dialects_against_loradeck_routes(back, loras, engine):
    proc = front_app(back.url, loras, "--remote-engine", engine)
    try:
        health = httpx.get(proc.url + "/health", timeout=30).json()
        assert health["loader"] == "remote"
        prompt = "The quick brown fox"
        for name in ("base", "A", "B"):
            body = {"prompt": prompt, "temperature": 0, "max_tokens": MAX, **SELECTIONS[name]}
            texts = [httpx.post(u + "/v1/completions", json=body, timeout=120).json()["choices"][0]["text"]
                     for u in (back.url, proc.url)]
            assert texts[0] == texts[1], (engine, name)
        # the weighted stack: LoRAX's merged_adapters; on vLLM / SGLang (one adapter per request) the stack blended
        # exactly from the files (cat), registered once and selected; the back computes the stack itself
        body = {"prompt": prompt, "temperature": 0, "max_tokens": MAX, **SELECTIONS["stack"]}
        direct = httpx.post(back.url + "/v1/completions", json=body, timeout=120).json()["choices"][0]["text"]
        for _ in range(2):  # the second time the cached blend is used
            r = httpx.post(proc.url + "/v1/completions", json=body, timeout=120)
            assert r.status_code == 200 and r.json()["choices"][0]["text"] == direct, (engine, r.text)
        if engine != "lorax":
            blends = [p.name for p in loras.iterdir() if p.name.startswith(".stack-")]
            assert len(blends) == 1, blends
            assert blends[0][1:] in [c["id"] for c in httpx.get(back.url + "/v1/models", timeout=30).json()["data"]]
        if engine != "lorax":  # chat: the template rendered through the engine's /tokenize
            assert answer(proc.url, SELECTIONS["A"]) == answer(back.url, SELECTIONS["A"])
    finally:
        proc.stop()


def test_auto_detects_engines_and_refuses_bad_addresses(back, loras):
    from webui.backends.remote.engines import LoraDeck, detect
    from webui.backends.remote.http import Http
    from webui.errors import BadInput, EngineUnavailable

    assert detect(Http(back.url)) is LoraDeck
    with pytest.raises(EngineUnavailable, match="no serving engine"):
        detect(Http("http://127.0.0.1:9"))
    from webui.backends import models

    with pytest.raises(BadInput, match="--loader remote"):
        models.resolve(back.url, "transformers", loras)
    r = subprocess.run([sys.executable, str(ROOT / "app.py"), "--loader", "remote", "--model", "tiny-llama",
                        "--nowebui"], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "URL" in r.stderr


def test_vllm_dialect_registers_adapters_through_the_adapter_root(back, loras, tmp_path):
    """An adapter the engine does not serve yet is registered at run time (vLLM's /v1/load_lora_adapter) with
    the path the engine sees: --remote-adapter-root maps our adapters folder onto the engine's storage."""
    ours = tmp_path / "front-loras"
    shutil.copytree(loras / "A", ours / "A2")
    shared = loras / "shared"  # the engine's view of the same files: inside its own adapters folder
    shutil.copytree(loras / "A", shared / "A2", dirs_exist_ok=True)
    proc = front_app(back.url, ours, "--remote-engine", "vllm", "--remote-adapter-root", str(shared))
    try:
        body = {"prompt": "The quick brown fox", "temperature": 0, "max_tokens": MAX, "model": "A2"}
        r = httpx.post(proc.url + "/v1/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        direct = httpx.post(back.url + "/v1/completions", json={**body, "model": "A"}, timeout=120).json()
        assert r.json()["choices"][0]["text"] == direct["choices"][0]["text"]
        models = [m["id"] for m in httpx.get(back.url + "/v1/models", timeout=30).json()["data"]]
        assert "A2" in models  # registered on the engine under our name
    finally:
        proc.stop()
        shutil.rmtree(shared)


def test_an_adapter_the_engine_would_reject_is_refused_with_the_fix(back, loras, tiny_models, tmp_path):
    """A DoRA adapter asked of a vLLM engine is refused by the front before the engine sees it (vLLM rejects
    DoRA; inspect --target's rules), naming the reason and the command that fixes it; the engine never gets it
    and the front keeps answering."""
    ours = tmp_path / "front-loras"
    shutil.copytree(loras / "A", ours / "A")
    write_adapter(tiny_models["llama"], ours / "D", target_modules=["q_proj", "v_proj"], r=4, alpha=8, seed=5,
                  use_dora=True)
    proc = front_app(back.url, ours, "--remote-engine", "vllm", "--remote-adapter-root", str(loras))
    try:
        body = {"prompt": "The quick brown fox", "temperature": 0, "max_tokens": MAX, "model": "D"}
        r = httpx.post(proc.url + "/v1/completions", json=body, timeout=120)
        assert r.status_code == 400, r.text
        message = r.json()["error"]["message"]
        assert "DoRA" in message and "python -m webui convert D --to lora" in message, message
        assert "D" not in [m["id"] for m in httpx.get(back.url + "/v1/models", timeout=30).json()["data"]]
        r = httpx.post(proc.url + "/v1/completions", json={**body, "model": "A"}, timeout=120)
        assert r.status_code == 200, r.text
    finally:
        proc.stop()


# -- llama.cpp's llama-server as the engine ---------------------------------------------------------------
@pytest.fixture(scope="module")
def llama_server_binary():
    """llama-server built from the pinned llama-cpp-python sdist (cached under ~/.cache/loradeck; built now if
    missing, which takes about 10 minutes on 2 cores)."""
    r = subprocess.run(["bash", str(ROOT / "scripts" / "build-llama-server.sh")], capture_output=True, text=True,
                       timeout=3600)
    if r.returncode != 0:
        pytest.skip(f"llama-server is not built and could not be built: {r.stderr.strip()[-500:]}")
    return r.stdout.strip().splitlines()[-1]


class LlamaServer:
    """llama-server on a loopback port with our GGUF LoRAs A and B (ids 0 and 1), single-threaded and without
    prompt caching so greedy answers repeat exactly."""

    def __init__(self, binary: str, base, loras, port: int | None = None):
        import os

        from tests.helpers import free_port
        from webui.backends.llamacpp.server_cmd import command

        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = command(binary, base, loras, self.port, extra=("-t", "1", "--no-cache-prompt", "-c", "1024",
                                                             "--parallel", "4", "--no-webui"))
        env = {**os.environ, "LD_LIBRARY_PATH": str(os.path.dirname(binary))}
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        wait_healthy(self.proc, self.url, "llama-server")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)


LORA = {"base": [0.0, 0.0], "A": [1.0, 0.0], "B": [0.0, 1.0], "stack": [0.7, 0.5]}


def llama_direct(url: str, name: str, messages=QUESTION) -> str:
    """The reply straight from llama-server's chat route, streamed as the front streams it. The tiny random model
    emits byte tokens that are not valid UTF-8: llama-server's chat route replaces them over the whole reply,
    its completions route token by token (one "\ufffd" per byte or per sequence), so the front must send chats
    to the chat route, not the rendered template to /v1/completions, to give the engine's own answer."""
    return streamed_chat(url, {"messages": messages, "temperature": 0, "max_tokens": MAX,
                               "lora": [{"id": i, "scale": s} for i, s in enumerate(LORA[name])]})


@pytest.fixture(scope="module")
def llama_setup(llama_server_binary, gguf_models, loras):
    from webui.backends.llamacpp.server_cmd import convert_for_llama_server

    base = gguf_models / "tiny-llama.gguf"
    converted = convert_for_llama_server(base, [loras / "A", loras / "B"])
    server = LlamaServer(llama_server_binary, base, converted)
    front = front_app(server.url, loras, "--remote-engine", "llama-server", "--remote-timeout", "20")
    yield server, front, (llama_server_binary, base, converted)
    front.stop()
    server.stop()


def front_selection(name: str) -> dict:
    return {**SELECTIONS[name], "model": ""} if name in ("base", "stack") else SELECTIONS[name]


def test_llama_server_answers_equal_direct_and_concurrent(llama_setup):
    server, front, _ = llama_setup
    direct = {name: llama_direct(server.url, name) for name in LORA}
    assert len(set(direct.values())) >= 3, direct
    for name in LORA:
        assert answer(front.url, front_selection(name)) == direct[name], name
    assert httpx.get(front.url + "/health", timeout=30).json()["loader"] == "remote"
    names = ["base", "A", "B", "stack", "A", "B"]
    requests = [{"selection": front_selection(n), "messages": [{"role": "user", "content": f"Number {i}?"}]}
                for i, n in enumerate(names)]
    expected = [llama_direct(server.url, n, r["messages"]) for n, r in zip(names, requests)]
    assert run_concurrently(front.url, requests) == expected


def test_llama_server_killed_and_restarted(llama_setup):
    server, front, (binary, base, converted) = llama_setup
    expected = llama_direct(server.url, "A")
    stream_until_killed(front.url, server.proc.kill)
    server.proc.wait(30)
    r = chat(front.url, SELECTIONS["A"])
    assert r.status_code == 503 and "unreachable" in r.json()["error"]["message"], r.text
    restarted = LlamaServer(binary, base, converted, port=server.port)
    server.proc = restarted.proc
    assert answer(front.url, SELECTIONS["A"]) == expected


def test_llama_server_command_line(gguf_models, loras):
    r = subprocess.run([sys.executable, "-m", "webui", "llama-server-command", "--model",
                        str(gguf_models / "tiny-llama.gguf"), "--lora", str(loras / "A"), str(loras / "B")],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    line = r.stdout.strip().splitlines()[-1]
    assert line.count("--lora ") == 1 and "--lora-init-without-apply" in line
    files = line.split("--lora ")[1].split()[0].split(",")
    assert [Path(f).parent.name for f in files] == ["A", "B"]


def test_vllm_dialect_refuses_registrations_beyond_its_slots(back, loras):
    """Where the engine's slot count is known (the managed vLLM), registrations stop one short of filling every
    slot (vLLM keeps a slot per registration until it restarts, and a full set makes its CPU build answer base rows
    with the last slot's adapter), with the fix named; nothing reaches the engine."""
    from webui.backends.remote.engines import VLLM
    from webui.backends.remote.http import Http
    from webui.errors import Unsupported

    shared = loras / "slots"
    for name in ("S1", "S2"):
        shutil.copytree(loras / "A", shared / name, dirs_exist_ok=True)
    dialect = VLLM(Http(back.url))
    dialect.describe()
    dialect.capacity = 1
    dialect.prepare("S1", shared / "S1")
    with pytest.raises(Unsupported, match="engine_max_loras") as refused:
        dialect.prepare("S2", shared / "S2")
    assert refused.value.code == "engine_slots_full"
    served = [m["id"] for m in httpx.get(back.url + "/v1/models", timeout=30).json()["data"]]
    assert "S1" in served and "S2" not in served
