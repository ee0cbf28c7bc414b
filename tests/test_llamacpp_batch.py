"""Continuous batching on the llama.cpp loader (webui/backends/llamacpp/batch.py): rows that join a running batch
at different steps, with different max_tokens, one cancelled midway, each give exactly the tokens the
single-request path (`stream_tokens`, llama-cpp-python's own generate loop) gives for that prompt alone with the
same adapter stack — on the embedded SmolLM2 Q4_1 GGUF and on the f32 tiny Llama with its GGUF LoRAs, one
adapter and a weighted stack; a row with another stack may not join; the prompt cache of a finished row is
reused by a prompt that extends it and gives the tokens of a cold start; seeded sampling and a JSON grammar
give the single path's tokens too; a prompt longer than the context is refused."""
from __future__ import annotations

import pytest

from webui.engine import Engine
from webui.errors import BadInput
from webui.options.config import GenerationParams, ModelSpec

pytest.importorskip("llama_cpp")

PROMPTS = ["The quick brown fox", "Once upon a time, in a land far away,",
           "Name three fruits and say why you like them:", "1, 2, 3, 4,"]
MAX_TOKENS = (24, 9, 31, 17)  # mixed budgets: rows leave at different steps


@pytest.fixture(scope="module")
def tiny(gguf_models, llama_loras):
    e = Engine(gguf_models, llama_loras)
    e.load(ModelSpec(model="tiny-llama.gguf", n_ctx=256))
    e.set_adapters({"A": 1.0, "B": 1.0})  # both converted and loaded (the stack the UI has does not matter)
    e.set_adapters({})
    yield e
    e.unload()


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    d = tmp_path_factory.mktemp("embedded-gguf")
    e = Engine(d, d)
    e.load(ModelSpec(loader="llamacpp", n_ctx=512))  # the embedded SmolLM2 GGUF
    yield e
    e.unload()


def single(backend, prompt: str, params: GenerationParams, adapters: dict) -> list[int]:
    """The token ids the single-request path generates for `prompt` alone with `adapters` active."""
    backend.set_adapters(adapters)
    ids = []
    for _, delta in backend.stream_tokens(prompt, params):
        ids += delta
    backend.set_adapters({})
    return ids


def drive(decoder, backend, plan: dict, params: dict, adapters: dict, cancel: dict | None = None) -> dict:
    """Run the decoder as the scheduler does: row k joins at step plan[k]; a row leaves at its end token, at its
    budget, or (cancel[k]) after that many tokens. Returns key -> (token ids, text)."""
    cancel = cancel or {}
    out, budget, step = {}, {}, 0
    while len(out) < len(plan) or decoder.rows:
        for k, at in plan.items():
            if at == step:
                assert decoder.can_join(adapters)
                budget[k] = decoder.add(k, backend.tokenize(PROMPTS[k]), params[k], adapters)
                out[k] = ([], "")
        for key, token, text in decoder.step():
            ids, so_far = out[key]
            ids.append(token)
            out[key] = (ids, so_far + text)
            if decoder.is_end(token) or len(ids) >= budget[key] or len(ids) == cancel.get(key):
                out[key] = (ids, out[key][1] + decoder.flush(key))
                decoder.remove(key)
        step += 1
        assert step < 500
    assert len(decoder) == 0
    decoder.close()
    return out


@pytest.mark.parametrize("model, adapters", [("smol", {}), ("tiny", {}), ("tiny", {"A": 1.0}),
                                             ("tiny", {"A": 0.7, "B": 0.4})],
                         ids=["embedded-base", "tiny-base", "tiny-A", "tiny-stack"])
def test_rows_joining_midway_give_the_single_path_tokens(model, adapters, request):
    engine = request.getfixturevalue(model)
    backend = engine._backend
    params = {k: GenerationParams(temperature=0, max_new_tokens=n) for k, n in enumerate(MAX_TOKENS)}
    expected = {k: single(backend, PROMPTS[k], params[k], adapters) for k in range(len(PROMPTS))}
    decoder = backend.decoder()
    assert decoder.capacity >= 4
    decoder.busy_chunk = 3  # prompts of rows joining a running batch go in 3-token pieces, spread over steps
    # rows 0 and 1 start together, 2 joins while they run, 3 joins later; row 2 is cancelled after 5 tokens
    got = drive(decoder, backend, {0: 0, 1: 0, 2: 3, 3: 7}, params, adapters, cancel={2: 5})
    for k in (0, 1, 3):
        assert got[k][0] == expected[k], f"row {k}"
        assert got[k][1] == backend.detokenize([t for t in expected[k] if not backend.is_end_of_sequence(t)]) \
            or model == "tiny"  # the tiny model's random bytes need not be valid UTF-8
    assert got[2][0] == expected[2][:5]
    assert backend.active_adapters == {}  # the UI's stack is never touched by the batch
    decoder.busy_chunk = type(decoder).busy_chunk


def test_can_join_only_the_running_stack(tiny):
    backend = tiny._backend
    decoder = backend.decoder()
    params = GenerationParams(temperature=0, max_new_tokens=4)
    assert decoder.can_join({"B": 1.0})  # empty: any stack
    decoder.add("a", backend.tokenize(PROMPTS[0]), params, {"A": 1.0})
    assert decoder.can_join({"A": 1.0})
    assert not decoder.can_join({"B": 1.0}) and not decoder.can_join({}) and not decoder.can_join({"A": 0.5})
    with pytest.raises(BadInput):
        decoder.add("b", backend.tokenize(PROMPTS[1]), params, {"B": 1.0})
    decoder.remove("a")
    assert decoder.can_join({"B": 1.0})
    with pytest.raises(BadInput, match="not loaded"):
        decoder.add("c", backend.tokenize(PROMPTS[1]), params, {"nope": 1.0})
    assert len(decoder) == 0


def test_prompt_cache_reuse_gives_the_cold_start_tokens(tiny):
    """A finished row's sequence stays cached; the next turn (its prompt + reply + more) decodes only the rest,
    and gives what a cold start gives. A cache made with another stack is not reused."""
    backend = tiny._backend
    decoder = backend.decoder()
    params = GenerationParams(temperature=0, max_new_tokens=20)
    first = PROMPTS[1] * 3
    decoder.add("t1", backend.tokenize(first), params, {"A": 1.0})
    reply = []
    while len(reply) < 20:
        reply += [t for _, t, _ in decoder.step()]
    decoder.remove("t1")
    second = first + backend.detokenize(reply) + " and then"
    ids = backend.tokenize(second)
    decoder.add("t2", ids, params, {"A": 1.0})
    assert len(decoder.rows["t2"].pending) < len(ids) - 20  # the first turn's tokens were reused
    got = []
    while len(got) < 20:
        got += [t for _, t, _ in decoder.step()]
    decoder.remove("t2")
    assert got == single(backend, second, params, {"A": 1.0})
    decoder.add("t3", ids, params, {"B": 1.0})  # another stack: computed from scratch
    assert len(decoder.rows["t3"].pending) == len(ids)
    decoder.remove("t3")


def test_sampling_and_grammar_follow_the_single_path(tiny):
    backend = tiny._backend
    decoder = backend.decoder()
    sampled = GenerationParams(temperature=0.9, top_p=0.9, top_k=20, min_p=0.05, repetition_penalty=1.1,
                               presence_penalty=0.2, frequency_penalty=0.1, seed=7, max_new_tokens=16)
    grammar = GenerationParams(temperature=0, max_new_tokens=16, response_format="json")
    params = {0: sampled, 1: grammar, 2: sampled, 3: GenerationParams(temperature=0, max_new_tokens=8)}
    expected = {k: single(backend, PROMPTS[k], params[k], {}) for k in params}
    got = drive(decoder, backend, {0: 0, 1: 0, 2: 1, 3: 2}, params, {})
    assert {k: ids for k, (ids, _) in got.items()} == expected


def test_too_long_prompt_is_refused(tiny):
    backend = tiny._backend
    decoder = backend.decoder()
    with pytest.raises(BadInput, match="context"):
        decoder.add("long", [backend.tokenize("a")[-1]] * decoder.n_ctx_seq, GenerationParams(), {})
    assert len(decoder) == 0
    # what fits alone fits in a batch: every row gets the context the model was loaded with
    assert decoder.n_ctx_seq == backend.llm.n_ctx()


def test_through_the_scheduler_each_request_gets_its_text_alone(tiny):
    """Requests arriving at random moments through the real scheduler, with mixed stacks (rows of one stack
    share steps, the others wait for the batch to drain) and mixed max_tokens: each gets the greedy text it
    gets alone (`Engine.generate`, llama-cpp-python's generate loop)."""
    import random
    import threading

    rnd = random.Random(3)
    stacks = [{}, {"A": 1.0}, {"A": 1.0}, {}, {"A": 0.5, "B": 0.7}, {"B": 1.0}, {}, {"A": 1.0}]
    reqs = [(" ".join(rnd.choice(PROMPTS).split()[:rnd.randint(2, 8)]), stacks[i], rnd.randint(1, 30),
             rnd.uniform(0, 0.1)) for i in range(len(stacks))]
    results: list = [None] * len(reqs)

    def client(i: int) -> None:
        prompt, stack, n, delay = reqs[i]
        threading.Event().wait(delay)
        handle = tiny.submit(prompt, GenerationParams(temperature=0, max_new_tokens=n), stack)
        results[i] = handle.text()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(reqs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, (prompt, stack, n, _) in enumerate(reqs):
        tiny.set_adapters(stack)
        assert results[i] == tiny.generate(prompt, GenerationParams(temperature=0, max_new_tokens=n)), i
    tiny.set_adapters({})


def test_no_second_context_where_two_rows_do_not_fit(gguf_models, llama_loras, monkeypatch):
    """Where fewer than two rows of the whole context fit in the decoder's KV budget (a big model at a long
    context), the loader makes no decoder, whose one row would only double the KV memory: concurrent requests
    with different stacks run one after another on the model's own context, each with the text it gets alone."""
    from webui.backends.llamacpp import batch as llamacpp_batch

    monkeypatch.setattr(llamacpp_batch, "KV_BUDGET", 1)
    e = Engine(gguf_models, llama_loras)
    e.load(ModelSpec(model="tiny-llama.gguf", n_ctx=256))
    try:
        e.prepare_adapters(["A"])
        assert e._backend.decoder() is None
        params = GenerationParams(temperature=0, max_new_tokens=12)
        stacks = [{}, {"A": 1.0}, {}, {"A": 1.0}]
        handles = [e.submit(PROMPTS[k], params, stacks[k]) for k in range(len(stacks))]
        texts = [h.text() for h in handles]
        with e.locked_backend():  # the batch has ended and put the UI's stack back (after its last reply)
            pass
        assert e._backend._decoder is None and e.active_adapters == {}
        for k, stack in enumerate(stacks):
            e.set_adapters(stack)
            assert texts[k] == e.generate(PROMPTS[k], params), k
    finally:
        e.unload()
