"""Fan-out (the `compare` field, INTERFACES.md): one prompt answered by several targets in one request, one choice
each, on the real app with the `openai` client, on transformers and llama.cpp. Each greedy choice equals the same
request sent alone with that target; `n` > 1, `stream` and several prompts are refused with a 400."""
from __future__ import annotations

import openai
import pytest

from tests.helpers import AppProcess

MAX = 10
TARGETS = ["", "A", {"adapters": [{"name": "A", "weight": 0.5}, {"name": "B", "weight": 1.0}]}, "B"]


def _alone(client, target, **kw):
    if isinstance(target, dict):
        return client.chat.completions.create(model="", extra_body={"adapters": target["adapters"]}, **kw)
    return client.chat.completions.create(model=target, **kw)


@pytest.fixture(scope="module", params=["transformers", "llamacpp"])
def client(request, gguf_models, llama_loras):
    model = "tiny-llama" if request.param == "transformers" else "tiny-llama.gguf"
    app = AppProcess("--model", model, "--loader", request.param, "--models-dir", str(gguf_models), "--loras-dir",
                     str(llama_loras), "--nowebui").wait_ready()
    yield openai.OpenAI(base_url=app.url + "/v1", api_key="unused", max_retries=0, timeout=120), request.param
    app.stop()


def test_each_choice_equals_the_request_alone(client):
    client, loader = client
    kw = dict(messages=[{"role": "user", "content": "Tell me a story"}], temperature=0, max_tokens=MAX)
    r = client.chat.completions.create(model="", extra_body={"compare": TARGETS}, **kw)
    base = "tiny-llama" if loader == "transformers" else "tiny-llama.gguf"
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert [c.model_extra["model"] for c in r.choices] == [base, "A", "A*0.5+B*1", "B"]
    alone = [_alone(client, t, **kw).choices[0].message.content for t in TARGETS]
    assert [c.message.content for c in r.choices] == alone
    assert len(set(alone)) == 4  # the targets do differ
    assert r.usage.completion_tokens == sum(_alone(client, t, **kw).usage.completion_tokens for t in TARGETS)
    text = client.completions.create(model="", prompt="The quick brown", temperature=0, max_tokens=MAX,
                                     extra_body={"compare": ["A", ""]})
    assert [c.text for c in text.choices] == [
        client.completions.create(model=m, prompt="The quick brown", temperature=0, max_tokens=MAX).choices[0].text
        for m in ("A", "")]


@pytest.mark.parametrize("extra, field", [({"n": 2}, "n"), ({"stream": True}, "stream"),
                                          ({"adapters": [{"name": "A"}]}, "adapters")])
def test_refused_with_a_400(client, extra, field):
    client, _ = client
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="", messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                       extra_body={"compare": ["", "A"], **extra})
    assert e.value.status_code == 400 and field in str(e.value)
    with pytest.raises(openai.BadRequestError, match="one prompt"):
        client.completions.create(model="", prompt=["a", "b"], max_tokens=4, extra_body={"compare": ["A"]})
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="", prompt="a", max_tokens=4, extra_body={"compare": ["nope"]})
