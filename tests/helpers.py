"""Helpers shared by the test modules (imported, never collected as tests): the checkout's root, the real app
started on a free loopback port, reference outputs computed with plain transformers and PEFT (the yardsticks
our Engine is compared with), a small Llama of any width, and training data files. Fixtures live in
conftest.py; page actions for the browser tests in tests/browser.py."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import torch

from webui.options.config import GenerationParams

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "The quick brown fox"
GREEDY = GenerationParams(temperature=0, max_new_tokens=12)
# GPTQModel's CPU int4 kernel needs a layer's input size to be a multiple of the group size: the GPTQ tiny
# Llama (the `gptq_dirs` fixture) is 128 wide, quantized in groups of 32.
GPTQ_GROUP = 32
# GPTQ vs float with the same change (relative L2 distance of all logits, 4-bit, group 32), measured here:
# GPTQ + adapter vs float + the same adapter 0.11 (A) and 0.17 (B); the exported merge-then-quantize model vs
# the float merged one 0.15; the adapters themselves move the logits by 1.1-1.2. Each quantized layer's
# weights are off by ~12% (GPTQ on random Gaussian weights); real checkpoints quantize better. The bound
# leaves room for other CPUs and kernels.
GPTQ_REL_TOL = 0.25
# Ours vs plain PEFT on the same bitsandbytes model (relative L2 distance of all logits): transformers' own
# model runs bitsandbytes' repacked bfloat16 CPU kernel on CPUs with AVX512-BF16 (our loader keeps it off:
# see webui/backends/hf/bnb.py), measured 0.005 on the 128-wide tiny Llama; on other CPUs both are the same
# computation. The adapters move the logits by 1.1-1.2.
BNB_REL_TOL = 0.02


def bnb_load_kwargs(quantization: str) -> dict:
    """from_pretrained arguments that quantize with bitsandbytes, written out as its docs do (not our helper)."""
    from transformers import BitsAndBytesConfig

    if quantization == "int8":
        return {"quantization_config": BitsAndBytesConfig(load_in_8bit=True)}
    return {"quantization_config": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quantization,
                                                      bnb_4bit_compute_dtype=torch.float32)}


# -- the real app --------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(proc: subprocess.Popen, url: str, what: str, timeout: float = 60, log=None) -> None:
    """Wait until a server process answers GET /health with 200; fail (with the end of `log`, a callable giving its
    output) when it exits or does not answer within `timeout` seconds."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{what} exited with {proc.returncode}" + (f":\n{log()[-3000:]}" if log else ""))
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"{what} did not answer within {timeout:.0f} s" + (f":\n{log()[-3000:]}" if log else ""))


def streamed_chat(url: str, body: dict, timeout: float = 120) -> str:
    """The text of a chat streamed from `url`'s /v1/chat/completions (`body` without `stream`): the deltas joined,
    as LoRA Deck joins an engine's stream. Fails on an error status or an error event."""
    text = ""
    with httpx.stream("POST", url + "/v1/chat/completions", json={**body, "stream": True}, timeout=timeout) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: {"):
                event = json.loads(line[6:])
                assert "error" not in event, event
                choices = event.get("choices") or [{}]
                text += (choices[0].get("delta") or {}).get("content") or ""
    return text


class AppProcess:
    """`python app.py ...` on a free loopback port; stopped when the test ends."""

    def __init__(self, *args: str, env: dict | None = None, port: int | None = None):
        self.port = port or free_port()  # a port of its own: a restarted server gets the same one back
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"lora-deck-app-{self.port}.log", "w+")
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--port", str(self.port), *args],
                                     cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})})

    def wait_ready(self, timeout: float = 180) -> "AppProcess":
        import urllib.request

        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"app exited with {self.proc.returncode}:\n{self.output()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.5)
        raise AssertionError(f"app not ready after {timeout} s:\n{self.output()}")

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


# -- references from plain transformers / PEFT ----------------------------------------------------------
def _load(path: Path, **load_kwargs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # device_map pins GPTQ folders to the CPU kernels too (float folders load on the CPU anyway); load_kwargs:
    # e.g. a bitsandbytes quantization_config
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, device_map={"": "cpu"},
                                                 **load_kwargs)
    return AutoTokenizer.from_pretrained(str(path)), model


def api_app(model_folder: Path, loras: Path) -> AppProcess:
    """The real app serving the API alone (--nowebui) for the model in `model_folder`, with `loras`, ready."""
    return AppProcess("--model", model_folder.name, "--models-dir", str(model_folder.parent), "--loras-dir",
                      str(loras), "--nowebui").wait_ready()


def _greedy(tok, model, prompt: str, max_new_tokens: int, **encode) -> str:
    ids = tok(prompt, return_tensors="pt", **encode)
    with torch.no_grad():
        out = model.generate(**ids, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def reference_greedy(path: Path, prompt: str, max_new_tokens: int, **load_kwargs) -> str:
    """Greedy continuation computed with plain transformers: the yardstick for our Engine."""
    tok, model = _load(path, **load_kwargs)
    return _greedy(tok, model, prompt, max_new_tokens)


def chat_reference(folder: Path, question: str, max_new_tokens: int) -> str:
    """Plain transformers' greedy reply to one user message, rendered with the folder's chat template."""
    tok, model = _load(folder)
    prompt = tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                     add_generation_prompt=True)
    return _greedy(tok, model, prompt, max_new_tokens, add_special_tokens=False)


def peft_model(base: Path, adapters: dict, combine: str = "cat", **load_kwargs):
    """(tokenizer, PeftModel) with `adapters` (name -> (path, weight)) active as plain PEFT does it:
    PeftModel.from_pretrained for one adapter at weight 1, add_weighted_adapter(..., combine) otherwise.
    `load_kwargs` go to the base's from_pretrained (e.g. quantization_config)."""
    from peft import PeftModel

    tok, model = _load(base, **load_kwargs)
    names = list(adapters)
    peft = PeftModel.from_pretrained(model, str(adapters[names[0]][0]), adapter_name=names[0])
    for n in names[1:]:
        peft.load_adapter(str(adapters[n][0]), adapter_name=n)
    if len(names) > 1 or adapters[names[0]][1] != 1.0:
        peft.add_weighted_adapter(names, [w for _, w in adapters.values()], "mix", combination_type=combine)
        peft.set_adapter("mix")
    else:
        peft.set_adapter(names[0])
    return tok, peft


def peft_reference(base: Path, adapters: dict, prompt: str = PROMPT, max_new_tokens: int = 12, combine=None,
                   **load_kwargs):
    """Plain PEFT's greedy text and the logits of every prompt position (see `peft_model`)."""
    tok, peft = peft_model(base, adapters, combine or "cat", **load_kwargs)
    text = _greedy(tok, peft, prompt, max_new_tokens)
    with torch.no_grad():
        logits = peft(**tok(prompt, return_tensors="pt")).logits[0]
    return text, logits


def hf_logits(engine, prompt: str = PROMPT) -> torch.Tensor:
    """The logits of every prompt position from the Engine's loaded transformers/GPTQ model."""
    backend = engine._backend
    with torch.no_grad():
        return backend.model(**backend.tokenizer(prompt, return_tensors="pt")).logits[0]


def rel_err(a, b) -> float:
    """Relative L2 distance of logits a from the reference b."""
    return float((a - b).norm() / b.norm())


# -- models and data ------------------------------------------------------------------------------------
def write_llama(out: Path, hidden: int, seed: int = 0, spread: float = 0.02) -> Path:
    """A 2-layer Llama of width `hidden` with the tiny models' tokenizer. Its layers have the spread of real
    checkpoints (`spread`): larger random weights make a chaotic network in which any rounding error (4-bit
    quantization) grows layer by layer (0.1: 3x the error). A wider lm_head (not quantized) gives decisive
    logits, as in webui/testing/tiny_models.py, so that greedy choices are not near-ties."""
    import transformers
    from transformers import AutoModelForCausalLM

    from webui.testing.tiny_models import build_tokenizer

    tok = build_tokenizer()
    config = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.3 if name.startswith("lm_head") else spread)
    model.generation_config.update(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                   pad_token_id=tok.pad_token_id)
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    return Path(out)


def write_data(folder: Path) -> dict[str, Path]:
    """Small training sets in every dataset format (raw text, instruction JSON, chat and ShareGPT JSONL)."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {"raw": folder / "story.txt"}
    files["raw"].write_text("The lighthouse keeper counts the ships. One, two, three ships pass by. " * 40)
    files["instruction"] = folder / "inst.json"
    files["instruction"].write_text(json.dumps(
        [{"instruction": f"Count to {i}.", "input": "", "output": " ".join(str(j) for j in range(1, i + 1))}
         for i in range(2, 14)]))
    files["chat"] = folder / "chat.jsonl"
    files["chat"].write_text("\n".join(json.dumps({"messages": [
        {"role": "system", "content": "You answer with colors."},
        {"role": "user", "content": f"Color number {i}?"},
        {"role": "assistant", "content": ["red", "green", "blue"][i % 3]}]}) for i in range(12)))
    files["sharegpt"] = folder / "sharegpt.jsonl"
    files["sharegpt"].write_text("\n".join(json.dumps({"conversations": [
        {"from": "human", "value": f"Say hello {i}"}, {"from": "gpt", "value": f"hello {i} hello"}]})
        for i in range(12)))
    return files


# -- llama.cpp -------------------------------------------------------------------------------------------
def llamacpp_logits(engine, prompt: str = PROMPT):
    """The last position's logits from the Engine's loaded llama.cpp model (numpy)."""
    import llama_cpp
    import numpy as np

    llm = engine._backend.llm
    llm.reset()
    llm.eval(engine._backend.tokenize(prompt))
    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),)).copy()


def converted_lora(loras: Path, name: str) -> Path:
    """The GGUF LoRA the llama.cpp loader converted adapter `name` into (cached beside its files)."""
    return next((loras / name).glob("adapter.*.gguf"))


# -- run folders (the Training tab's history) -----------------------------------------------------------
def write_run(runs: Path, name: str, losses: list[float], eval_losses: dict[int, float] | None = None,
              base: str = "tiny-llama", state: str = "done", updated: float = 1_700_000_000.0) -> Path:
    """A finished run's folder as the trainer leaves it (config, status.json, metrics.jsonl: one row per
    step, an eval row at the steps of `eval_losses`), written directly so a test needs no training."""
    run = runs / name
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.yaml").write_text(f"output: {name}\nbase_model: {base}\n")
    (run / "status.json").write_text(json.dumps({"state": state, "step": len(losses), "max_steps": len(losses),
                                                 "base": base, "updated": updated}))
    rows = [{"step": i + 1, "loss": loss, "learning_rate": 1e-3, "time": updated - 100 + i}
            for i, loss in enumerate(losses)]
    rows += [{"step": step, "eval_loss": loss, "time": updated} for step, loss in (eval_losses or {}).items()]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


def bf16_copy(folder: Path, out: Path) -> Path:
    """The transformers model `folder` saved again in bfloat16 at `out`, tokenizer and chat template included: a
    checkpoint in the precision most published models ship in."""
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.bfloat16).save_pretrained(str(out))
    for f in Path(folder).iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy2(f, Path(out) / f.name)
    return Path(out)
