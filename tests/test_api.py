"""The OpenAI-compatible API, driven with the official `openai` client against the real app on a loopback
port: each request's adapter gives that adapter's greedy output (equal to plain PEFT), concurrent requests
for different adapters are batched and each gets its own answer, the API key is enforced, and every bad
input gets its 4xx with an OpenAI-style error body."""
import json
import shutil
import threading

import httpx
import openai
import pytest

from tests.helpers import api_app, peft_reference, reference_greedy
from webui.testing.tiny_models import CHAT_TEMPLATE, write_adapter  # noqa: F401  (template documents the prompt)

MAX = 12


@pytest.fixture(scope="module")
def setup(tiny_models, tmp_path_factory):
    loras = tmp_path_factory.mktemp("api-loras")
    base = tiny_models["llama"]
    write_adapter(base, loras / "A", target_modules=["q_proj", "v_proj"], r=4, seed=1)
    write_adapter(base, loras / "B", target_modules="all-linear", r=8, alpha=16, seed=2)
    return base, loras


@pytest.fixture(scope="module")
def app(setup, tiny_models):
    base, loras = setup
    proc = api_app(base, loras)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def client(app):
    return openai.OpenAI(base_url=app.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def chat_prompt(text: str) -> str:
    return f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"


def ref(setup, adapters: dict, prompt: str) -> str:
    base, loras = setup
    if not adapters:
        return reference_greedy(base, prompt, MAX)
    return peft_reference(base, {n: (loras / n, w) for n, w in adapters.items()}, prompt, MAX)[0]


def chat(client, model, text="Hello there", **kw):
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": text}],
                                       temperature=0, max_tokens=MAX, **kw)
    return r


def test_models_lists_base_and_adapters(client):
    ids = [m.id for m in client.models.list().data]
    assert ids[0] == "tiny-llama" and set(ids[1:]) == {"A", "B"}


def test_chat_per_adapter_equals_peft(client, setup):
    for model, adapters in (("A", {"A": 1.0}), ("B", {"B": 1.0}), ("tiny-llama", {})):
        r = chat(client, model)
        assert r.choices[0].message.content == ref(setup, adapters, chat_prompt("Hello there")), model
        assert r.model == model and r.usage.prompt_tokens > 0 and r.usage.completion_tokens > 0


def test_streaming_equals_non_streaming(client, setup):
    expected = ref(setup, {"B": 1.0}, "The quick brown")
    full = client.completions.create(model="B", prompt="The quick brown", temperature=0, max_tokens=MAX)
    assert full.choices[0].text == expected
    chunks = client.completions.create(model="B", prompt="The quick brown", temperature=0, max_tokens=MAX,
                                       stream=True)
    assert "".join(c.choices[0].text for c in chunks) == expected
    stream = chat(client, "A", stream=True)
    parts = [c.choices[0].delta.content or "" for c in stream]
    assert "".join(parts) == chat(client, "A").choices[0].message.content


def test_weighted_stack_in_request(client, setup):
    r = chat(client, "", extra_body={"adapters": [{"name": "A", "weight": 1.0}, {"name": "B", "weight": 0.5}]})
    assert r.choices[0].message.content == ref(setup, {"A": 1.0, "B": 0.5}, chat_prompt("Hello there"))


def test_lorax_style_local_adapter_id(client, setup):
    r = chat(client, "", extra_body={"adapter_id": "A", "adapter_source": "local"})
    assert r.choices[0].message.content == ref(setup, {"A": 1.0}, chat_prompt("Hello there"))


def test_eight_concurrent_requests_each_get_their_adapter(client, setup):
    plan = [("tiny-llama", {}), ("A", {"A": 1.0}), ("B", {"B": 1.0})] * 3
    plan = plan[:8]
    prompts = [f"Hello {i}" for i in range(8)]
    expected = [ref(setup, adapters, chat_prompt(p)) for (_, adapters), p in zip(plan, prompts)]
    got = [None] * 8
    barrier = threading.Barrier(8)

    def call(i):
        barrier.wait()
        got[i] = chat(client, plan[i][0], text=prompts[i]).choices[0].message.content

    threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert got == expected


def test_client_disconnect_frees_the_slot(app, client, setup):
    with httpx.stream("POST", app.url + "/v1/completions", timeout=60,
                      json={"model": "A", "prompt": "One, two", "max_tokens": 200, "temperature": 0,
                            "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data:"):
                break  # got the first token; hang up
    r = chat(client, "B")  # answered promptly: the abandoned request no longer holds the model
    assert r.choices[0].message.content == ref(setup, {"B": 1.0}, chat_prompt("Hello there"))


def _post(app, path, body, **kw):
    # json.dumps writes NaN as NaN (what a careless client sends); httpx's json= would refuse it
    r = httpx.post(app.url + path, content=json.dumps(body), timeout=60,
                   headers={"content-type": "application/json"}, **kw)
    return r.status_code, r.json()


@pytest.mark.parametrize("body, status, fragment", [
    ({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, 404, "not found"),
    ({"model": "tiny-llama", "messages": "hi"}, 400, "messages"),
    ({"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400, "temperature"),
    ({"model": "tiny-llama", "messages": []}, 400, "messages"),
    ({"model": "tiny-llama", "messages": [{"role": "wizard", "content": "hi"}]}, 400, "role"),
    ({"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 300}, 400, "context"),
    ({"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}], "n": 0}, 400, "n"),
    ({"model": "", "messages": [{"role": "user", "content": "hi"}], "adapters": [{"name": "../A"}]}, 400, "not allowed"),
    ({"model": "", "messages": [{"role": "user", "content": "hi"}], "adapters": [{"name": "ghost"}]}, 404, "not found"),
    ({"model": "", "messages": [{"role": "user", "content": "hi"}], "adapter_id": "/etc",
      "adapter_source": "local"}, 400, "escapes"),
    ({"model": "A", "messages": [{"role": "user", "content": "hi"}], "adapters": [{"name": "B"}]}, 400, "model"),
    ({"model": "", "messages": [{"role": "user", "content": "hi"}],
      "adapters": [{"name": "A", "weight": float("nan")}]}, 400, "finite"),
])
def test_bad_input_gets_4xx(app, body, status, fragment):
    code, data = _post(app, "/v1/chat/completions", body)
    assert code == status, data
    assert fragment in data["error"]["message"] and data["error"]["type"]


def test_malformed_json_body(app):
    r = httpx.post(app.url + "/v1/completions", content=b"{not json", timeout=30,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and "malformed" in r.json()["error"]["message"]


def test_broken_and_incompatible_adapters_are_4xx(app, setup, adapters_with_problems):
    code, data = _post(app, "/v1/chat/completions", {"model": "nan-weights", "messages": [{"role": "user", "content": "x"}]})
    assert code == 400 and "non-finite" in data["error"]["message"]
    code, data = _post(app, "/v1/chat/completions", {"model": "other-base", "messages": [{"role": "user", "content": "x"}]})
    assert code == 400 and data["error"]["code"] == "adapter_incompatible"
    assert "adapter expects" in data["error"]["message"]
    r = httpx.get(app.url + "/v1/adapters", timeout=60).json()["data"]
    verdicts = {a["adapter"]: a["verdict"] for a in r}
    assert verdicts == {"A": "ok", "B": "ok", "nan-weights": "incompatible", "other-base": "incompatible"}


@pytest.fixture
def adapters_with_problems(setup, tiny_models, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    from webui.testing.tiny_models import build_model, build_tokenizer

    base, loras = setup
    shutil.copytree(loras / "A", loras / "nan-weights")
    w = loras / "nan-weights" / "adapter_model.safetensors"
    state = load_file(str(w))
    state[sorted(state)[0]][0, 0] = float("nan")
    save_file(state, str(w))
    tok = build_tokenizer()
    model = build_model("llama", tok)
    model.config.hidden_size = 48
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_config(model.config).save_pretrained(str(tmp_path / "wide"))
    tok.save_pretrained(str(tmp_path / "wide"))
    write_adapter(tmp_path / "wide", loras / "other-base", target_modules=["q_proj"])
    yield
    shutil.rmtree(loras / "nan-weights")
    shutil.rmtree(loras / "other-base")
    del torch


def test_api_key_and_ui_default_adapters(start_app, setup, tiny_models):
    base, loras = setup
    app = start_app("--model", "tiny-llama", "--models-dir", str(base.parent), "--loras-dir", str(loras),
                    "--api-key", "s3cret", "--lora", "A")
    anonymous = openai.OpenAI(base_url=app.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        anonymous.models.list()
    r = httpx.get(app.url + "/v1/models", timeout=30)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"

    client = openai.OpenAI(base_url=app.url + "/v1", api_key="s3cret", max_retries=0)
    with_a = ref(setup, {"A": 1.0}, chat_prompt("Hello there"))
    plain_ref = ref(setup, {}, chat_prompt("Hello there"))
    assert plain_ref != with_a

    def no_model():  # a request that names no model gets the app's active adapters (here --lora A)
        r = httpx.post(app.url + "/v1/chat/completions", timeout=60, headers={"Authorization": "Bearer s3cret"},
                       json={"messages": [{"role": "user", "content": "Hello there"}], "temperature": 0,
                             "max_tokens": MAX})
        return r.json()["choices"][0]["message"]["content"]

    assert no_model() == with_a
    # "" or the base's name is the plain base (INTERFACES), as is an explicit empty stack
    assert chat(client, "").choices[0].message.content == plain_ref
    assert chat(client, "tiny-llama").choices[0].message.content == plain_ref
    assert chat(client, "tiny-llama", extra_body={"adapters": []}).choices[0].message.content == plain_ref
    assert no_model() == with_a  # none of those requests changed the app's adapters
    health = httpx.get(app.url + "/health").json()
    assert health["adapters"] == {"A": 1.0}


def test_api_beside_the_web_ui(start_app, setup):
    base, loras = setup
    app = start_app("--model", "tiny-llama", "--models-dir", str(base.parent), "--loras-dir", str(loras))
    assert httpx.get(app.url + "/", timeout=30).status_code == 200
    data = httpx.get(app.url + "/v1/models", timeout=30).json()
    assert data["data"][0]["id"] == "tiny-llama"
    assert json.loads(json.dumps(data))  # plain JSON
