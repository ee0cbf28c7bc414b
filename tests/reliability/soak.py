"""The soak: the real app (`app.py --nowebui`) on a loopback port, hammered by concurrent API clients, each
request naming its own adapters in one of the API's dialects (OpenAI `model` / `adapters`, streamed or not,
llama-server `lora`, vLLM model=adapter incl. one loaded at run time, SGLang BASE:ADAPTER, LoRAX `/generate`
with `adapter_id` or `merged_adapters`), while one more client keeps changing the app's own state: it swaps
the active stack (POST /lora-adapters), merges and unmerges it, and loads/unloads runtime adapters (vLLM).

Every answer must equal the greedy text plain PEFT gives for its prompt and stack (computed here, once per
stack and prompt), every request must get exactly one answer, and the server's threads and open files must
not grow; its RSS growth is reported. Used by tests/reliability/test_soak.py (short, and a long run behind
`--soak`) and by the `soak` benchmark row (bench/soak.py). Not collected by pytest (no test_ prefix).
"""
from __future__ import annotations

import itertools
import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
import torch

from tests.helpers import AppProcess

PROMPTS = ["The quick brown fox", "Once upon a time", "Hello! How can"]
# the stacks clients ask for: the plain base, single adapters, weighted stacks
STACKS = {"base": {}, "A": {"A": 1.0}, "B": {"B": 1.0}, "C": {"C": 1.0},
          "A+B": {"A": 0.7, "B": 0.4}, "B+C": {"B": 0.5, "C": 1.0}}
# what the state-changing client makes active meanwhile (never what a request without adapters would see:
# every soak request names its own stack)
SWAP_STACKS = [{"A": 1.0}, {"B": 0.6, "C": 0.3}, {"C": 1.0}, {"A": 0.5, "B": 0.5, "C": 0.5}]
FORMS = ["openai", "openai-stream", "llama-server", "vllm", "sglang", "lorax"]
RUNTIME = "late-C"  # C again, loaded through vLLM's /v1/load_lora_adapter under a name of the client's choosing
TIMEOUT = 300


def write_adapters(base: Path, loras: Path) -> Path:
    """A (attention, r=4), B (all-linear, r=8) and C (attention, r=4, another seed) for the tiny Llama."""
    from webui.testing.tiny_models import write_adapter

    write_adapter(base, loras / "A", target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], r=4, alpha=8, seed=1)
    write_adapter(base, loras / "B", target_modules="all-linear", r=8, alpha=16, seed=2)
    write_adapter(base, loras / "C", target_modules=["q_proj", "v_proj"], r=4, alpha=8, seed=7)
    return loras


def references(base: Path, loras: Path, max_tokens: int) -> dict[tuple[str, str], str]:
    """Plain PEFT's greedy continuation for every (stack, prompt): the base with adapters disabled, a single
    adapter set active, a weighted stack as PEFT's add_weighted_adapter(combination_type="cat")."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base))
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    peft = PeftModel.from_pretrained(model, str(loras / "A"), adapter_name="A")
    for name in ("B", "C"):
        peft.load_adapter(str(loras / name), adapter_name=name)

    def greedy(prompt: str) -> str:
        ids = tok(prompt, return_tensors="pt")
        with torch.no_grad():
            out = peft.generate(**ids, do_sample=False, max_new_tokens=max_tokens, pad_token_id=tok.pad_token_id)
        return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)

    refs = {}
    for i, (key, stack) in enumerate(STACKS.items()):
        if not stack:
            with peft.disable_adapter():
                refs.update({(key, p): greedy(p) for p in PROMPTS})
            continue
        if len(stack) == 1 and next(iter(stack.values())) == 1.0:
            peft.set_adapter(next(iter(stack)))
        else:
            peft.add_weighted_adapter(list(stack), list(stack.values()), f"mix{i}", combination_type="cat")
            peft.set_adapter(f"mix{i}")
        refs.update({(key, p): greedy(p) for p in PROMPTS})
    return refs


@dataclass
class SoakResult:
    clients: int
    requests: int = 0  # answered (right or wrong)
    wrong: int = 0
    errors: int = 0  # requests that failed (HTTP error, exception)
    swaps: int = 0
    merges: int = 0
    unmerges: int = 0
    loads: int = 0
    state_errors: int = 0  # unexpected failures of the state-changing client
    duplicate_ids: int = 0
    rss_before_mb: float = 0.0
    rss_after_mb: float = 0.0
    threads: tuple[int, int] = (0, 0)  # server threads before / after the storm
    fds: tuple[int, int] = (0, 0)
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)

    @property
    def rss_growth_mb(self) -> float:
        return self.rss_after_mb - self.rss_before_mb

    def summary(self) -> str:
        return (f"{self.requests} requests from {self.clients} clients over {len(STACKS)} stacks of 3 adapters and "
                f"{len(FORMS)} request forms in {self.seconds:.0f} s, while {self.swaps} swaps, {self.merges} merges, "
                f"{self.unmerges} unmerges and {self.loads} runtime loads ran: errors {self.errors}, wrong answers "
                f"{self.wrong}, duplicate ids {self.duplicate_ids}, state-change errors {self.state_errors}; "
                f"RSS {self.rss_before_mb:.0f} -> {self.rss_after_mb:.0f} MB ({self.rss_growth_mb:+.1f} MB), "
                f"threads {self.threads[0]} -> {self.threads[1]}, fds {self.fds[0]} -> {self.fds[1]}")


class Soak:
    def __init__(self, app: AppProcess, loras: Path, refs: dict, max_tokens: int):
        self.url, self.loras, self.refs, self.max_tokens = app.url, loras, refs, max_tokens
        self.proc = psutil.Process(app.proc.pid)
        self.base = httpx.get(self.url + "/v1/models", timeout=TIMEOUT).json()["data"][0]["id"]
        self.ids = {row["path"].rsplit("/", 1)[-1]: row["id"] for row in
                    httpx.get(self.url + "/lora-adapters", timeout=TIMEOUT).json()}
        self.lock = threading.Lock()

    # -- one request in one dialect ------------------------------------------------------------------
    def request(self, form: str, key: str, prompt: str) -> tuple[str, str | None]:
        """(text, response id) for `prompt` under STACKS[key], asked in `form` (or in OpenAI's `adapters` form
        where that dialect cannot name the stack: LoRAX and vLLM have no weighted stack of their own kind)."""
        stack = STACKS[key]
        single = next(iter(stack)) if len(stack) == 1 and next(iter(stack.values())) == 1.0 else None
        body = {"prompt": prompt, "max_tokens": self.max_tokens, "temperature": 0}
        if form == "lorax" and stack:
            params = {"max_new_tokens": self.max_tokens, "do_sample": False}
            if single:
                params.update(adapter_id=single, adapter_source="local")
            else:
                params["merged_adapters"] = {"ids": list(stack), "weights": list(stack.values()),
                                             "merge_strategy": "linear"}
            r = httpx.post(self.url + "/generate", json={"inputs": prompt, "parameters": params}, timeout=TIMEOUT)
            r.raise_for_status()
            return r.json()["generated_text"], None
        if form == "llama-server":
            body["lora"] = [{"id": self.ids[n], "scale": w} for n, w in stack.items()]
        elif form in ("vllm", "sglang") and (single or not stack):
            name = RUNTIME if single == "C" and form == "vllm" else single
            body["model"] = (f"{self.base}:{name}" if form == "sglang" else name) if single else self.base
        else:  # openai, openai-stream, and the fallback
            body.update(model="", adapters=[{"name": n, "weight": w} for n, w in stack.items()])
        if form != "openai-stream":
            r = httpx.post(self.url + "/v1/completions", json=body, timeout=TIMEOUT)
            r.raise_for_status()
            data = r.json()
            return data["choices"][0]["text"], data["id"]
        text, rid = "", None
        with httpx.stream("POST", self.url + "/v1/completions", json={**body, "stream": True}, timeout=TIMEOUT) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    chunk = json.loads(line[6:])
                    rid = chunk["id"]
                    text += "".join(c.get("text") or "" for c in chunk["choices"])
        return text, rid

    # -- the clients -----------------------------------------------------------------------------------
    def client(self, n: int, count: int, result: SoakResult, seen: set) -> None:
        keys = list(STACKS)
        for j in range(count):
            form, key, prompt = FORMS[(n + j) % len(FORMS)], keys[(3 * n + j) % len(keys)], PROMPTS[(n + 2 * j) % 3]
            try:
                text, rid = self.request(form, key, prompt)
            except Exception as e:  # noqa: BLE001 - any failure is counted and reported, whatever its kind
                with self.lock:
                    result.errors += 1
                    result.problems.append(f"client {n} #{j} {form} {key}: {type(e).__name__}: {e}")
                continue
            with self.lock:
                result.requests += 1
                if rid is not None:
                    result.duplicate_ids += rid in seen
                    seen.add(rid)
                if text != self.refs[(key, prompt)]:
                    result.wrong += 1
                    result.problems.append(f"client {n} #{j} {form} {key} {prompt!r}: got {text!r}, "
                                           f"plain PEFT {self.refs[(key, prompt)]!r}")

    def changer(self, stop: threading.Event, result: SoakResult) -> None:
        """Swap, merge, swap while merged, unmerge, load and unload a runtime adapter, over and over."""
        for k in itertools.count():
            if stop.is_set():
                break
            stack = SWAP_STACKS[k % len(SWAP_STACKS)]
            steps = [("swaps", "/lora-adapters", [{"id": self.ids[n], "scale": w} for n, w in stack.items()]),
                     ("merges", "/lora-adapters/merge", None),
                     ("swaps", "/lora-adapters", [{"id": self.ids[n], "scale": w}
                                                  for n, w in SWAP_STACKS[(k + 1) % len(SWAP_STACKS)].items()]),
                     ("unmerges", "/lora-adapters/unmerge", None),
                     ("loads", "/v1/load_lora_adapter", {"lora_name": f"extra{k}", "lora_path": str(self.loras / "B")}),
                     (None, "/v1/unload_lora_adapter", {"lora_name": f"extra{k}"})]
            for counter, path, body in steps:
                try:
                    httpx.post(self.url + path, json=body, timeout=TIMEOUT).raise_for_status()
                    if counter:
                        with self.lock:
                            setattr(result, counter, getattr(result, counter) + 1)
                except Exception as e:  # noqa: BLE001 - counted and reported as the clients do
                    with self.lock:
                        result.state_errors += 1
                        result.problems.append(f"state change {path}: {type(e).__name__}: {e}")
                time.sleep(0.02)  # a person clicking, not a busy loop: clients get the model in between

    def _measure(self) -> tuple[float, int, int]:
        time.sleep(1.0)  # let finished connections close
        return self.proc.memory_info().rss / 2**20, self.proc.num_threads(), self.proc.num_fds()

    def run(self, clients: int, requests: int) -> SoakResult:
        result = SoakResult(clients)
        r = httpx.post(self.url + "/v1/load_lora_adapter",
                       json={"lora_name": RUNTIME, "lora_path": str(self.loras / "C")}, timeout=TIMEOUT)
        r.raise_for_status()
        # a warm-up of the same shape (every form once per client, with the state changing meanwhile), so the
        # server's thread pool, adapter cache and allocator reach their working size before the figures are taken
        warm = SoakResult(clients)
        self._storm(clients, len(FORMS), warm)
        if warm.errors or warm.wrong or warm.state_errors:
            raise AssertionError("the warm-up already failed:\n" + "\n".join(warm.problems[:10]))
        rss, threads, fds = self._measure()
        start = time.perf_counter()
        self._storm(clients, requests, result)
        result.seconds = time.perf_counter() - start
        httpx.post(self.url + "/lora-adapters/unmerge", timeout=TIMEOUT)
        rss2, threads2, fds2 = self._measure()
        result.rss_before_mb, result.rss_after_mb = rss, rss2
        result.threads, result.fds = (threads, threads2), (fds, fds2)
        return result

    def _storm(self, clients: int, requests: int, result: SoakResult) -> None:
        """`clients` threads of `requests` requests each, and the state-changing client until they are done."""
        seen: set = set()
        stop = threading.Event()
        changer = threading.Thread(target=self.changer, args=(stop, result), daemon=True)
        threads = [threading.Thread(target=self.client, args=(n, requests, result, seen), daemon=True)
                   for n in range(clients)]
        for t in [changer, *threads]:
            t.start()
        for t in threads:
            t.join()
        stop.set()
        changer.join(TIMEOUT)


def run_soak(model_folder: Path, loras: Path, clients: int = 8, requests: int = 6, max_tokens: int = 8) -> SoakResult:
    """Start the app on `model_folder` with `loras` (A, B, C from write_adapters), compute the references,
    run the soak, stop the app."""
    refs = references(model_folder, loras, max_tokens)
    app = AppProcess("--model", model_folder.name, "--models-dir", str(model_folder.parent), "--loras-dir",
                     str(loras), "--nowebui").wait_ready()
    try:
        return Soak(app, loras, refs, max_tokens).run(clients, requests)
    finally:
        app.stop()
