"""The remote loader against real vLLM: vLLM's CPU build (scripts/install-vllm.sh, a cached venv of its own)
serving a 2-layer Llama of width 256 (vLLM's CPU attention wants a head size of 64) on a loopback port, with
LoRA at run time. A LoRA Deck (`--loader remote`) in front of it registers our adapters with vLLM itself; every
answer through the front is compared with the same request sent straight to vLLM: base, each adapter, an
adapter added to the folder after the front started, an untrained adapter (refused: it changes nothing), a
weighted stack (blended by us; the reference is plain
PEFT's `cat` blend registered with vLLM by the test), six concurrent mixed requests, and the engine killed
mid-stream and started again. The restarted vLLM has `--max-loras 2`, and the silent no-op guard must catch
vLLM's last-slot bug: once both slots hold an adapter, base rows batched with adapter rows get the last one.
The module skips where vLLM's CPU build is not installed (CI installs it)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
from pathlib import Path

import httpx
import pytest

from tests.helpers import ROOT, AppProcess, free_port, peft_model, wait_healthy, write_llama
from webui.testing.tiny_models import write_adapter

MAX = 12
BASE = "tiny256"
QUESTION = [{"role": "user", "content": "Name three colors."}]
STACK = {"A": 0.7, "B": 0.5}


def _vllm_python() -> str | None:
    r = subprocess.run(["bash", str(ROOT / "scripts" / "install-vllm.sh"), "--check"], capture_output=True,
                       text=True, check=False)
    return r.stdout.strip().splitlines()[-1] if r.returncode == 0 else None


PYTHON = _vllm_python()
pytestmark = pytest.mark.skipif(PYTHON is None, reason="vLLM's CPU build is not installed (scripts/install-vllm.sh)")


class Vllm:
    """vLLM's OpenAI server, started the way its docs say, in a process group of its own (it starts an engine
    process beside the API server)."""

    def __init__(self, model: Path, max_loras: int, port: int | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"vllm-{self.port}.log", "a+")
        args = [PYTHON, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--served-model-name",
                BASE, "--host", "127.0.0.1", "--port", str(self.port), "--dtype", "float32", "--max-model-len",
                "256", "--enforce-eager", "--enable-lora", "--max-lora-rank", "16", "--max-loras", str(max_loras),
                # prefix caching off: a request's greedy text must not depend on what ran before it
                "--no-enable-prefix-caching"]
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        try:
            wait_healthy(self.proc, self.url, "vLLM", timeout=600, log=self.output)
        except AssertionError:
            self.kill()
            raise

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("vllm")
    base = write_llama(d / "llama256", 256, seed=0)
    loras = d / "loras"
    write_adapter(base, loras / "A", target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], r=4, alpha=8, seed=1)
    write_adapter(base, loras / "B", target_modules="all-linear", r=8, alpha=16, seed=2)
    # plain PEFT's blend of the stack, for vLLM to serve as the reference (outside our adapters folder)
    _, peft = peft_model(base, {n: (loras / n, w) for n, w in STACK.items()}, combine="cat")
    peft.save_pretrained(str(d / "reference"), selected_adapters=["mix"])
    # A, B, our blend, the reference blend, A2 and Z each take a slot for good (vLLM's unload only forgets the
    # name): a seventh stays empty (the last-slot bug)
    engine = Vllm(base, max_loras=7)
    front = AppProcess("--loader", "remote", "--model", engine.url, "--loras-dir", str(loras), "--nowebui",
                       "--remote-timeout", "60").wait_ready(300)
    yield {"dir": d, "base": base, "loras": loras, "engine": engine, "front": front}
    front.stop()
    for e in (engine, getattr(engine, "restarted", None)):  # the first vLLM, and the one the kill test started
        if e is not None:
            e.kill()


def chat(url: str, model: str, messages=QUESTION, **extra) -> httpx.Response:
    body = {"messages": messages, "temperature": 0, "max_tokens": MAX, "model": model, **extra}
    return httpx.post(url + "/v1/chat/completions", json=body, timeout=300)


def answer(url: str, model: str, messages=QUESTION, **extra) -> str:
    r = chat(url, model, messages, **extra)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def register(url: str, name: str, path: Path) -> None:
    r = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)}, timeout=120)
    assert r.status_code == 200 or "already" in r.text, r.text


def test_base_adapters_and_stack_equal_vllm_direct(setup):
    engine, front, loras = setup["engine"], setup["front"], setup["loras"]
    health = httpx.get(front.url + "/health", timeout=30).json()
    assert health["loader"] == "remote"
    assert answer(front.url, BASE) == answer(engine.url, BASE)
    for name in ("A", "B"):
        through = answer(front.url, name)  # the front registers the adapter with vLLM at run time
        served = [m["id"] for m in httpx.get(engine.url + "/v1/models", timeout=30).json()["data"]]
        assert name in served, served
        assert through == answer(engine.url, name), name
    assert len({answer(engine.url, m) for m in (BASE, "A", "B")}) == 3  # the adapters change the answer

    # a weighted stack: vLLM takes one adapter per request, so the front blends the files (PEFT's cat) once and
    # registers the blend; the reference is plain PEFT's blend registered by the test
    register(engine.url, "reference-stack", setup["dir"] / "reference" / "mix")
    stack = {"model": "", "adapters": [{"name": n, "weight": w} for n, w in STACK.items()]}
    body = {"messages": QUESTION, "temperature": 0, "max_tokens": MAX, **stack}
    r = httpx.post(front.url + "/v1/chat/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == answer(engine.url, "reference-stack")
    blends = [p.name for p in loras.iterdir() if p.name.startswith(".stack-")]
    assert len(blends) == 1 and blends[0][1:] in [m["id"] for m in httpx.get(engine.url + "/v1/models").json()["data"]]


def test_an_adapter_added_after_the_start_is_registered_at_run_time(setup):
    engine, front, loras = setup["engine"], setup["front"], setup["loras"]
    shutil.copytree(loras / "A", loras / "A2")  # a new adapter in the folder, unknown to vLLM
    assert answer(front.url, "A2") == answer(engine.url, "A")
    assert "A2" in [m["id"] for m in httpx.get(engine.url + "/v1/models", timeout=30).json()["data"]]


def test_an_adapter_that_changes_nothing_is_refused(setup):
    """An untrained adapter (PEFT's default init: B = 0) loads on vLLM and changes nothing: the guard's probe
    answers exactly as the base, and the adapter is refused, naming the engine and the adapter."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(setup["base"]))
    get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])).save_pretrained(
        str(setup["loras"] / "Z"))
    r = chat(setup["front"].url, "Z")
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "adapter_changes_nothing", error
    assert "vllm" in error["message"] and "'Z'" in error["message"], error
    assert answer(setup["front"].url, BASE) == answer(setup["engine"].url, BASE)


def test_six_concurrent_mixed_requests(setup):
    engine, front = setup["engine"], setup["front"]
    names = [BASE, "A", "B", BASE, "A", "B"]
    messages = [[{"role": "user", "content": f"Tell me about number {i}."}] for i in range(len(names))]
    direct = [answer(engine.url, n, m) for n, m in zip(names, messages)]
    results: list = [None] * len(names)

    def one(i: int) -> None:
        results[i] = answer(front.url, names[i], messages[i])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(names))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert results == direct


def test_token_logprobs_through_the_front_equal_plain_peft(setup):
    """Scoring on vLLM (its prompt log-probabilities): `echo` + `logprobs` through the front under adapter A give
    the log-probabilities plain transformers + PEFT compute for the same tokens, so evaluation and lm-eval work
    on a vLLM engine."""
    import torch

    text = "The quick brown fox jumps over the lazy dog."
    body = {"prompt": text, "echo": True, "logprobs": 1, "max_tokens": 0, "temperature": 0, "model": "A"}
    r = httpx.post(setup["front"].url + "/v1/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    ours = r.json()["choices"][0]["logprobs"]["token_logprobs"]
    tok, peft = peft_model(setup["base"], {"A": (setup["loras"] / "A", 1.0)})
    ids = tok(text, return_tensors="pt").input_ids
    with torch.no_grad():
        logp = torch.log_softmax(peft(input_ids=ids).logits[0].double(), -1)
    reference = [float(logp[i, ids[0, i + 1]]) for i in range(ids.shape[1] - 1)]
    assert ours[0] is None and len(ours) == len(reference) + 1
    assert max(abs(a - b) for a, b in zip(ours[1:], reference)) < 1e-3, (ours, reference)


def test_killed_restarted_and_the_last_slot_bug_is_caught(setup):
    """vLLM killed mid-stream: a clean error and a front that keeps running; started again (it forgot every
    adapter registered at run time): the front registers them again. The new vLLM has only 2 LoRA slots: with A
    in one, registering B fills the last, and vLLM then answers base rows batched with B's rows with B. The guard's
    probes must see it and refuse B, naming the engine and the adapter."""
    engine, front = setup["engine"], setup["front"]
    answer(front.url, "A")  # registered with vLLM by the front (when this test runs alone)
    base_direct = answer(engine.url, BASE)
    a_direct = answer(engine.url, "A")
    body = {"messages": QUESTION, "temperature": 0, "max_tokens": 200, "stream": True, "model": "A",
            "ignore_eos": True}
    events = []
    with httpx.stream("POST", front.url + "/v1/chat/completions", json=body, timeout=300) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                events.append(json.loads(line[6:]))
                if len(events) == 2:
                    engine.kill()
    errors = [e["error"] for e in events if "error" in e]
    assert errors and "engine" in errors[0]["message"], events[-3:]
    r = chat(front.url, BASE)  # engine down: a clean 503, the front keeps running
    assert r.status_code == 503 and r.json()["error"]["code"] == "engine_unavailable", r.text
    assert httpx.get(front.url + "/health", timeout=30).status_code == 200

    engine.restarted = again = Vllm(setup["base"], max_loras=2, port=engine.port)
    assert answer(front.url, "A") == a_direct  # A registered again by the front
    assert answer(front.url, BASE) == base_direct
    r = chat(front.url, "B")
    assert r.status_code in (400, 409, 422), r.text
    message = r.json()["error"]["message"]
    assert "vllm" in message and "'B'" in message and "plain base" in message, message
    assert "B" not in [m["id"] for m in httpx.get(again.url + "/v1/models", timeout=30).json()["data"]]
