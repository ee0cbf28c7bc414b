"""Continuous batching on the transformers loader, through the real scheduler and the real tiny Llama with
two LoRA adapters: requests that arrive at random moments, with mixed adapters (and a weighted stack),
different max_tokens, stop strings and a cancellation, each get exactly the greedy text they get alone
(`Engine.generate`: one request through transformers' own `generate`, and plain PEFT for one adapter);
rows really share steps; long prompts are prefilled in chunks between the others' steps; the UI's stack and
merge are back afterwards. No timing is asserted."""
from __future__ import annotations

import random
import threading

import pytest

from tests.helpers import peft_model
from webui.backends.hf import continuous as hf_continuous
from webui.backends.hf import few_rows
from webui.engine import UI_STACK, Engine
from webui.options.config import GenerationParams, ModelSpec

WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly hum old songs".split()
STACKS = [UI_STACK, {}, {"A": 1.0}, {"B": 1.0}, {"A": 0.5, "B": 0.7}]


@pytest.fixture(scope="module")
def engine(gguf_models, llama_loras):
    e = Engine(gguf_models, llama_loras)
    e.load(ModelSpec(model="tiny-llama", loader="transformers"))
    e.prepare_adapters(["A", "B"])
    return e


def requests(seed: int, n: int) -> list[dict]:
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        prompt = " ".join(rnd.choice(WORDS) for _ in range(rnd.randint(1, 20)))
        out.append({"prompt": prompt, "stack": STACKS[i % len(STACKS)], "max": rnd.randint(1, 40),
                    "delay": rnd.uniform(0, 0.15)})
    return out


def alone(engine: Engine, req: dict, ui_stack: dict) -> str:
    engine.set_adapters(ui_stack if req["stack"] is UI_STACK else req["stack"])
    try:
        return engine.generate(req["prompt"], GenerationParams(temperature=0, max_new_tokens=req["max"]))
    finally:
        engine.set_adapters(ui_stack)


def run_concurrently(engine: Engine, reqs: list[dict]) -> list:
    """Each request submitted from its own thread after its delay; returns (text, finish_reason, tokens)."""
    results: list = [None] * len(reqs)

    def client(i: int, req: dict) -> None:
        threading.Event().wait(req["delay"])
        params = GenerationParams(temperature=0, max_new_tokens=req["max"], stop=req.get("stop", []))
        handle = engine.submit(req["prompt"], params, req["stack"])
        if req.get("cancel"):
            next(iter(handle), None)
            handle.close()
            results[i] = ("cancelled", handle.finish_reason, None)
            return
        text = handle.text()
        results[i] = (text, handle.finish_reason, handle.completion_tokens)

    threads = [threading.Thread(target=client, args=(i, r)) for i, r in enumerate(reqs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    with engine.locked_backend():  # the batch has ended and restored the UI's stack (after its last reply)
        pass
    return results


@pytest.fixture
def widths(monkeypatch):
    """Records how many rows each decode step ran, makes prompts prefill in chunks of 8 tokens, and makes each
    step last a few milliseconds more (the tiny model is so fast that requests would rarely overlap)."""
    seen: list[int] = []
    real_step = hf_continuous.HfDecoder.step
    monkeypatch.setattr(hf_continuous, "PREFILL_CHUNK", 8)

    def step(self):
        seen.append(len(self._order))
        threading.Event().wait(0.003)
        return real_step(self)

    monkeypatch.setattr(hf_continuous.HfDecoder, "step", step)
    return seen


def transposed_form(engine, monkeypatch) -> None:
    """The decode steps' Linear layers as W·xᵀ (webui/backends/hf/few_rows.py) whether or not this CPU measured that
    faster on the tiny model; it stays installed for the module's later tests (as it would in the app)."""
    model = engine._backend.model
    few_rows._decided.pop(model, None)
    monkeypatch.setattr(few_rows, "_faster_transposed", lambda weight: True)
    assert few_rows.install(model)


@pytest.mark.parametrize("form", ["measured", "transposed"])
def test_random_arrivals_each_get_their_text_alone(engine, widths, form, monkeypatch):
    if form == "transposed":
        transposed_form(engine, monkeypatch)
    engine.set_adapters({"B": 1.0})  # the UI's stack: requests naming no adapters get it
    reqs = requests(seed=0, n=15)
    expected = [alone(engine, r, {"B": 1.0}) for r in reqs]
    # a stop string inside one reply, and one request cancelled after its first piece
    j = next(i for i, t in enumerate(expected) if len(t) > 12)
    reqs[j]["stop"] = [expected[j][6:10]]
    reqs[(j + 1) % len(reqs)]["cancel"] = True
    results = run_concurrently(engine, reqs)
    for i, (req, want, got) in enumerate(zip(reqs, expected, results)):
        if req.get("cancel"):
            continue
        if i == j:
            assert got[0] == want[:want.find(req["stop"][0])] and got[1] == "stop"
            continue
        assert got[0] == want, f"request {i} ({req['stack']}, max {req['max']})"
        assert got[1] in ("stop", "length") and (got[1] == "stop" or got[2] == req["max"])
    assert max(widths) >= 3, "requests never shared a decode step"
    assert engine.active_adapters == {"B": 1.0}
    engine.clear_adapters()


@pytest.mark.parametrize("form", ["measured", "transposed"])
def test_single_adapter_rows_match_plain_peft(engine, llama_loras, gguf_models, form, monkeypatch):
    """The mixed rows against plain PEFT (not our own generate): base, A and B side by side."""
    if form == "transposed":
        transposed_form(engine, monkeypatch)
    reqs = [{"prompt": p, "stack": s, "max": 10, "delay": 0.01 * i}
            for i, (p, s) in enumerate([("The quick brown fox", {"A": 1.0}), ("Seven wizards", {"B": 1.0}),
                                         ("A lazy dog", {}), ("Old songs", {"A": 1.0})])]
    want = []
    for r in reqs:
        if r["stack"]:
            name = next(iter(r["stack"]))
            tok, model = peft_model(gguf_models / "tiny-llama", {name: (llama_loras / name, 1.0)})
        else:
            from tests.helpers import _load
            tok, model = _load(gguf_models / "tiny-llama")
        ids = tok(r["prompt"], return_tensors="pt")
        out = model.generate(**ids, do_sample=False, max_new_tokens=r["max"], pad_token_id=tok.pad_token_id)
        want.append(tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
    got = [g[0] for g in run_concurrently(engine, reqs)]
    assert got == want


def test_merged_ui_stack_is_merged_again(engine, widths):
    engine.set_adapters({"A": 1.0})
    engine.merge_adapters()
    reqs = [{"prompt": "one two three", "stack": s, "max": 6, "delay": 0.02 * i}
            for i, s in enumerate([UI_STACK, {"B": 1.0}, UI_STACK, {"A": 0.5, "B": 0.5}])]
    expected = []
    for r in reqs:
        engine.unmerge_adapters()
        expected.append(alone(engine, r, {"A": 1.0}))
        engine.merge_adapters()
    got = [g[0] for g in run_concurrently(engine, reqs)]
    assert got == expected
    assert engine.active_adapters == {"A": 1.0} and engine.merged
    engine.unmerge_adapters()
    engine.clear_adapters()


def test_a_request_naming_a_cached_adapter_joins_the_running_batch(engine, monkeypatch):
    """A request naming its adapter has it checked before it is queued (`Engine.prepare_adapters`, as every API
    route does). A running batch holds the model until its last row ends, so that check must not wait for the
    model when the adapter is cached: the request joins the batch at its next step."""
    widths, gate, stepping = [], threading.Event(), threading.Event()
    real_step = hf_continuous.HfDecoder.step

    def step(self):  # the first step waits for the gate: the batch is running and holds the model meanwhile
        widths.append(len(self._order))
        stepping.set()
        assert gate.wait(30)
        return real_step(self)

    monkeypatch.setattr(hf_continuous.HfDecoder, "step", step)
    params = GenerationParams(temperature=0, max_new_tokens=12)
    first = engine.submit("The quick brown fox", params, {})
    assert stepping.wait(30)
    checked = threading.Event()
    threading.Thread(target=lambda: (engine.prepare_adapters(["A"]), checked.set()), daemon=True).start()
    try:
        assert checked.wait(30), "checking a cached adapter waited for the running batch to end"
        second = engine.submit("a lazy dog", params, {"A": 1.0})
    finally:
        gate.set()
    texts = first.text(), second.text()
    assert max(widths) == 2  # the second request ran in the first one's batch
    assert texts == (alone(engine, {"prompt": "The quick brown fox", "stack": {}, "max": 12}, {}),
                     alone(engine, {"prompt": "a lazy dog", "stack": {"A": 1.0}, "max": 12}, {}))


def test_a_bad_request_fails_alone(engine):
    good = engine.submit("The quick brown fox", GenerationParams(temperature=0, max_new_tokens=5), {})
    bad = engine.submit("The quick brown fox", GenerationParams(temperature=0, max_new_tokens=5),
                                  {"missing": 1.0})
    with pytest.raises(Exception, match="not loaded"):
        bad.text()
    assert good.text() == engine.generate("The quick brown fox", GenerationParams(temperature=0, max_new_tokens=5))


@pytest.mark.parametrize("quantized", ["gptq", "nf4"])
def test_quantized_bases_batch_continuously(quantized, request, widths):
    """The same on a GPTQ 4-bit base and a bitsandbytes nf4 base: mixed single adapters and the base, arriving
    at random moments, each get the text they get alone."""
    models, loras = request.getfixturevalue("gptq_dirs" if quantized == "gptq" else "bnb_dirs")
    e = Engine(models, loras)
    e.load(ModelSpec(model="tiny-gptq", loader="gptq") if quantized == "gptq" else
           ModelSpec(model="tiny-float", loader="transformers", quantization="nf4"))
    e.prepare_adapters(["A", "B"])
    reqs = requests(seed=1, n=6)
    for i, r in enumerate(reqs):
        r["stack"] = [{}, {"A": 1.0}, {"B": 1.0}][i % 3]
    expected = [alone(e, r, {}) for r in reqs]
    assert [g[0] for g in run_concurrently(e, reqs)] == expected
    assert max(widths) >= 2
    e.unload()
