"""Other LoRA servers' clients against LoRA Deck, unchanged: LoRAX's own Python client (`lorax-client`) on
/generate, /generate_stream and POST /; vLLM's runtime adapter routes and /tokenize; llama-server's
/lora-adapters and per-request `lora`; SGLang's BASE:ADAPTER; and the OpenAI fields real clients rely on
(logprobs, echo with max_tokens 0 as lm-eval sends it, n, several prompts, include_usage). Outputs are
compared with plain PEFT / transformers computed here; log-probabilities with a plain forward pass."""
from __future__ import annotations

import json
import shutil

import httpx
import numpy as np
import openai
import pytest
import torch
from lorax import Client as LoraxClient
from lorax.errors import ValidationError as LoraxValidationError

from tests.helpers import api_app, peft_model, peft_reference, reference_greedy

MAX = 12
PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def loras(llama_loras, tiny_models, tmp_path_factory):
    """The shared A (r=4), B (r=8) and misfit `other`, plus C (r=4 like A: ties/dare need equal ranks)."""
    from webui.testing.tiny_models import write_adapter

    d = tmp_path_factory.mktemp("dialect-loras")
    for name in ("A", "B", "other"):
        shutil.copytree(llama_loras / name, d / name)
    write_adapter(tiny_models["llama"], d / "C", target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], r=4,
                  alpha=8, seed=7)
    return d


@pytest.fixture(scope="module")
def app(tiny_models, loras):
    proc = api_app(tiny_models["llama"], loras)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def client(app):
    return openai.OpenAI(base_url=app.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def ref(tiny_models, loras, adapters: dict, prompt: str = PROMPT) -> str:
    base = tiny_models["llama"]
    if not adapters:
        return reference_greedy(base, prompt, MAX)
    return peft_reference(base, {n: (loras / n, w) for n, w in adapters.items()}, prompt, MAX)[0]


def forward_logprobs(tiny_models, loras, adapters: dict, text: str) -> tuple[list[int], np.ndarray]:
    """Plain PEFT/transformers: the tokenizer's ids of `text` and log p(ids[i+1] | ids[:i+1])."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = tiny_models["llama"]
    if adapters:
        tok, model = peft_model(base, {n: (loras / n, w) for n, w in adapters.items()})
    else:
        tok, model = AutoTokenizer.from_pretrained(str(base)), AutoModelForCausalLM.from_pretrained(str(base))
    ids = tok(text)["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, :-1].float(), -1)
    return ids, logp.gather(1, torch.tensor(ids[1:])[:, None])[:, 0].numpy()


# -- LoRAX ---------------------------------------------------------------------------------------------
def test_lorax_client_generate_with_details(app, tiny_models, loras):
    lorax = LoraxClient(app.url, timeout=120)
    r = lorax.generate(PROMPT, adapter_id="A", adapter_source="local", max_new_tokens=MAX, details=True,
                       decoder_input_details=True)
    assert r.generated_text == ref(tiny_models, loras, {"A": 1.0})
    assert r.details.generated_tokens == len(r.details.tokens) > 0
    # the reference: PEFT's own greedy token ids, and log_softmax of its logits over prompt + those ids
    tok, model = peft_model(tiny_models["llama"], {"A": (loras / "A", 1.0)})
    prompt_ids = tok(PROMPT)["input_ids"]
    with torch.no_grad():
        generated = model.generate(input_ids=torch.tensor([prompt_ids]), do_sample=False, max_new_tokens=MAX,
                                   pad_token_id=tok.pad_token_id)[0, len(prompt_ids):].tolist()
        ids = prompt_ids + generated
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, :-1].float(), -1)
    want = logp.gather(1, torch.tensor(ids[1:])[:, None])[:, 0].numpy()
    assert [t.id for t in r.details.prefill] == prompt_ids and [t.id for t in r.details.tokens] == generated
    got = [t.logprob for t in r.details.prefill[1:]] + [t.logprob for t in r.details.tokens]
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert r.details.prefill[0].logprob is None
    base = lorax.generate(PROMPT, max_new_tokens=MAX)  # no adapter: the plain base
    assert base.generated_text == ref(tiny_models, loras, {})


def test_lorax_client_stream_and_merged_adapters(app, tiny_models, loras):
    lorax = LoraxClient(app.url, timeout=120)
    events = list(lorax.generate_stream(PROMPT, adapter_id="B", adapter_source="local", max_new_tokens=MAX))
    expected = ref(tiny_models, loras, {"B": 1.0})
    assert "".join(e.token.text for e in events) == expected == events[-1].generated_text
    assert events[-1].details.generated_tokens == len(events)
    merged = {"ids": ["A", "B"], "weights": [1.0, 0.5], "merge_strategy": "linear", "density": 1.0}
    r = lorax.generate(PROMPT, merged_adapters=merged, max_new_tokens=MAX)
    assert r.generated_text == ref(tiny_models, loras, {"A": 1.0, "B": 0.5})
    ties = {"ids": ["A", "C"], "weights": [1.0, 1.0], "merge_strategy": "ties", "density": 0.5}
    first = lorax.generate(PROMPT, merged_adapters=ties, max_new_tokens=MAX).generated_text
    assert lorax.generate(PROMPT, merged_adapters=ties, max_new_tokens=MAX).generated_text == first  # cached blend
    folder = [Path_name(e["path"]) for e in httpx.get(app.url + "/lora-adapters", timeout=30).json()]
    assert (loras / ".merged").is_dir() and folder == ["A", "B", "C", "other"]  # the cache is hidden
    assert first != ref(tiny_models, loras, {"A": 1.0, "C": 1.0})  # ties prunes and elects signs: not the sum
    with pytest.raises(Exception, match="same r value"):  # PEFT's own refusal, passed on
        lorax.generate(PROMPT, merged_adapters={**ties, "ids": ["A", "B"]}, max_new_tokens=MAX)


def test_lorax_raw_requests_and_errors(app):
    r = httpx.post(app.url + "/", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 4}}, timeout=60)
    assert r.status_code == 200 and isinstance(r.json(), list) and "generated_text" in r.json()[0]
    info = httpx.get(app.url + "/info", timeout=30).json()
    assert info["model_id"] == "tiny-llama" and info["max_total_tokens"] > 0
    lorax = LoraxClient(app.url, timeout=60)
    for kwargs, fragment in ((dict(adapter_id="ghost", adapter_source="local"), "not found"),
                             (dict(adapter_id="/etc", adapter_source="local"), "escapes"),
                             (dict(adapter_id="other", adapter_source="local"), "does not fit")):
        with pytest.raises(Exception, match=fragment):
            lorax.generate(PROMPT, max_new_tokens=4, **kwargs)
    r = httpx.post(app.url + "/generate", timeout=30, json={"inputs": PROMPT, "parameters": {
        "merged_adapters": {"ids": ["A", "B"], "weights": [1.0], "density": 1.0}}})
    assert r.status_code == 422 and r.json()["error_type"] == "validation" and "same length" in r.json()["error"]
    r = httpx.post(app.url + "/generate", timeout=30, json={"inputs": PROMPT, "parameters": {
        "merged_adapters": {"ids": ["A", "B"], "weights": [1.0, 1.0], "density": 1.0, "merge_strategy": "magic"}}})
    assert r.status_code == 422 and "merge_strategy" in r.json()["error"]
    with pytest.raises(LoraxValidationError):
        LoraxClient(app.url).generate("", max_new_tokens=4)  # refused by the client itself, as with LoRAX


# -- vLLM, llama-server, SGLang ------------------------------------------------------------------------
def test_vllm_load_request_unload(app, client, tiny_models, loras):
    r = httpx.post(app.url + "/v1/load_lora_adapter", json={"lora_name": "mine", "lora_path": str(loras / "A")},
                   timeout=60)
    assert r.status_code == 200, r.text
    cards = {m.id: m for m in client.models.list().data}
    assert cards["mine"].parent == "tiny-llama" and cards["mine"].root == str(loras / "A")
    text = client.completions.create(model="mine", prompt=PROMPT, temperature=0, max_tokens=MAX).choices[0].text
    assert text == ref(tiny_models, loras, {"A": 1.0})
    assert httpx.post(app.url + "/v1/unload_lora_adapter", json={"lora_name": "mine"}, timeout=30).status_code == 200
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="mine", prompt=PROMPT, max_tokens=2)
    outside = httpx.post(app.url + "/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/etc"}, timeout=30)
    assert outside.status_code == 400 and "escapes" in outside.json()["error"]["message"]
    misfit = httpx.post(app.url + "/v1/load_lora_adapter", json={"lora_name": "y", "lora_path": str(loras / "other")},
                        timeout=60)
    assert misfit.status_code == 400 and "does not fit" in misfit.json()["error"]["message"]


def test_vllm_tokenize_detokenize(app, tiny_models):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_models["llama"]))
    r = httpx.post(app.url + "/tokenize", json={"prompt": PROMPT}, timeout=30).json()
    assert r["tokens"] == tok(PROMPT)["input_ids"] and r["count"] == len(r["tokens"]) and r["max_model_len"] > 0
    back = httpx.post(app.url + "/detokenize", json={"tokens": r["tokens"]}, timeout=30).json()
    assert back["prompt"] == tok.decode(r["tokens"])


def test_llama_server_lora_routes(app, client, tiny_models, loras):
    table = httpx.get(app.url + "/lora-adapters", timeout=30).json()
    ids = {Path_name(e["path"]): e["id"] for e in table}
    assert set(ids) >= {"A", "B"} and all(e["scale"] == 0 for e in table)
    body = {"model": "", "prompt": PROMPT, "temperature": 0, "max_tokens": MAX, "lora": [{"id": ids["B"], "scale": 1.0}]}
    r = httpx.post(app.url + "/v1/completions", json=body, timeout=60).json()
    assert r["choices"][0]["text"] == ref(tiny_models, loras, {"B": 1.0})
    assert httpx.post(app.url + "/lora-adapters", json=[{"id": ids["A"], "scale": 1.0}], timeout=60).status_code == 200
    assert {Path_name(e["path"]): e["scale"] for e in httpx.get(app.url + "/lora-adapters").json()}["A"] == 1.0
    health = httpx.get(app.url + "/health").json()
    assert health["adapters"] == {"A": 1.0}  # the app's active stack: what the UI shows
    no_model = client.completions.create(prompt=PROMPT, model="", temperature=0, max_tokens=MAX)
    assert no_model.choices[0].text == ref(tiny_models, loras, {})  # "" is still the plain base
    httpx.post(app.url + "/lora-adapters", json=[], timeout=60)
    bad = httpx.post(app.url + "/v1/completions", json={**body, "lora": [{"id": 99, "scale": 1.0}]}, timeout=30)
    assert bad.status_code == 404 and "lora id 99" in bad.json()["error"]["message"]


def Path_name(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def test_sglang_base_colon_adapter(client, tiny_models, loras):
    r = client.completions.create(model="tiny-llama:B", prompt=PROMPT, temperature=0, max_tokens=MAX)
    assert r.choices[0].text == ref(tiny_models, loras, {"B": 1.0})


# -- OpenAI fields ----------------------------------------------------------------------------------------
def test_completion_logprobs_and_echo_as_lm_eval_sends_them(app, tiny_models, loras):
    context, continuation = "The quick brown", " fox jumps"
    body = {"model": "A", "prompt": context + continuation, "echo": True, "logprobs": 1, "max_tokens": 0,
            "temperature": 0}
    r = httpx.post(app.url + "/v1/completions", json=body, timeout=60).json()
    assert "choices" in r, r
    lp = r["choices"][0]["logprobs"]
    ids, want = forward_logprobs(tiny_models, loras, {"A": 1.0}, context + continuation)
    from transformers import AutoTokenizer
    own = AutoTokenizer.from_pretrained(str(tiny_models["llama"]))(context + continuation, add_special_tokens=False)
    assert len(lp["tokens"]) == len(own["input_ids"]) and lp["token_logprobs"][0] is None
    np.testing.assert_allclose(lp["token_logprobs"][1:], want[-(len(own["input_ids"]) - 1):], atol=1e-4)
    assert r["choices"][0]["text"] == context + continuation
    assert all(isinstance(t, dict) and len(t) >= 1 for t in lp["top_logprobs"][1:])
    assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])


def test_chat_logprobs_n_prompts_and_usage(client, tiny_models, loras):
    r = client.chat.completions.create(model="B", messages=[{"role": "user", "content": "Hello"}], temperature=0,
                                       max_tokens=MAX, logprobs=True, top_logprobs=2, n=2)
    assert len(r.choices) == 2 and [c.index for c in r.choices] == [0, 1]
    assert r.choices[0].message.content == r.choices[1].message.content  # greedy: n copies
    content = r.choices[0].logprobs.content
    assert "".join(t.token for t in content) == r.choices[0].message.content
    assert all(len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob >= t.logprob - 1e-6 for t in content)
    assert all(bytes(t.bytes).decode("utf-8", "replace") == t.token for t in content)
    many = client.completions.create(model="A", prompt=["One, two", PROMPT], temperature=0, max_tokens=MAX)
    assert [c.text for c in many.choices] == [ref(tiny_models, loras, {"A": 1.0}, p) for p in ("One, two", PROMPT)]
    chunks = list(client.completions.create(model="A", prompt=PROMPT, temperature=0, max_tokens=MAX, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert "".join(c.choices[0].text for c in chunks[:-1]) == ref(tiny_models, loras, {"A": 1.0})


def test_logprobs_cannot_be_streamed_yet(app):
    body = {"model": "A", "prompt": PROMPT, "logprobs": 1, "stream": True, "max_tokens": 4}
    r = httpx.post(app.url + "/v1/completions", content=json.dumps(body), timeout=30,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and "stream" in r.json()["error"]["message"]


SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "color": {"enum": ["red", "green", "blue"]},
                                           "n": {"type": "integer", "minimum": 0, "maximum": 9}},
          "required": ["ok", "color", "n"], "additionalProperties": False}


def _valid(text: str) -> dict:
    data = json.loads(text)
    assert set(data) == {"ok", "color", "n"} and isinstance(data["ok"], bool)
    assert data["color"] in ("red", "green", "blue") and isinstance(data["n"], int) and 0 <= data["n"] <= 9
    return data


def test_response_format_json_schema_is_enforced(client, app):
    """A random tiny model writes valid JSON only because every token is constrained."""
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA}}
    for model in ("tiny-llama", "A"):
        r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Answer in JSON"}],
                                           temperature=0, max_tokens=60, response_format=fmt)
        _valid(r.choices[0].message.content)
    sampled = client.chat.completions.create(model="B", messages=[{"role": "user", "content": "JSON"}], n=3,
                                             temperature=1.0, seed=3, max_tokens=60, response_format=fmt)
    for choice in sampled.choices:
        _valid(choice.message.content)
    free = client.completions.create(model="A", prompt="{", temperature=0, max_tokens=40,
                                     extra_body={"response_format": {"type": "json_object"}})
    json.loads(free.choices[0].text)
    lorax = LoraxClient(app.url, timeout=120)
    r = lorax.generate("JSON:", max_new_tokens=60, response_format={"type": "json_object", "schema": SCHEMA})
    _valid(r.generated_text)


def test_a_schema_that_cannot_be_enforced_is_a_400(app):
    body = {"model": "A", "messages": [{"role": "user", "content": "x"}], "max_tokens": 4,
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}}
    r = httpx.post(app.url + "/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 400 and "response_format" in r.json()["error"]["message"]
    body["response_format"] = {"type": "json_schema"}
    assert httpx.post(app.url + "/v1/chat/completions", json=body, timeout=30).status_code == 400
