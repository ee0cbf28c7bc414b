"""Scoring a text: the per-token log-probabilities every loader returns (what loss, perplexity, `echo` and
prompt logprobs are made of), checked against the libraries themselves: a plain transformers forward pass
(log_softmax of the logits) with PEFT for adapters, and llama-cpp-python's own logits."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.helpers import GREEDY, PROMPT, peft_model
from webui.engine import Engine
from webui.errors import BadInput
from webui.options.config import ModelSpec

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Hello! How can I help you today?", PROMPT]


def _reference(model, tok, text: str) -> tuple[list[int], np.ndarray]:
    ids = tok(text)["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
    logp = torch.log_softmax(logits, -1)
    return ids, logp.gather(1, torch.tensor(ids[1:])[:, None])[:, 0].numpy()


@pytest.fixture(scope="module")
def engine(tiny_models, llama_loras):
    e = Engine(tiny_models["llama"].parent, llama_loras)
    e.load(ModelSpec(model=tiny_models["llama"].name, loader="transformers"))
    yield e
    e.unload()


def test_transformers_scores_equal_a_plain_forward_pass(engine, tiny_models):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tiny_models["llama"]
    tok = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    scores = engine.score(TEXTS, top_k=3)  # one batch of different lengths (right-padded)
    for text, got in zip(TEXTS, scores):
        ids, want = _reference(model, tok, text)
        assert got.ids == ids
        np.testing.assert_allclose(got.logprobs, want, atol=1e-4)
        assert len(got.top) == len(ids) - 1 and all(len(t) == 3 for t in got.top)
        assert all(t[0][1] >= lp - 1e-6 for t, lp in zip(got.top, got.logprobs))  # the best is at least the pick


def test_scores_under_an_adapter_equal_peft_and_leave_the_active_stack(engine, tiny_models, llama_loras):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_models["llama"]))
    engine.set_adapters({"B": 1.0})
    stack = {"A": 1.0, "B": 0.5}
    got = engine.score(TEXTS[:2], adapters=stack)
    _, reference = peft_model(tiny_models["llama"], {n: (llama_loras / n, w) for n, w in stack.items()})
    for text, scores in zip(TEXTS, got):
        _, want = _reference(reference, tok, text)
        np.testing.assert_allclose(scores.logprobs, want, atol=1e-4)
    assert engine.active_adapters == {"B": 1.0}
    plain = engine.score(TEXTS[:1], adapters={})[0].logprobs
    assert not np.allclose(plain, got[0].logprobs, atol=1e-3)  # the adapters changed the scores
    engine.set_adapters({})


def test_a_single_token_cannot_be_scored(engine):
    with pytest.raises(BadInput, match="fewer than 2 tokens"):
        engine.score([[1]])


def test_llamacpp_scores_equal_llama_cpp_python_logits(gguf_models):
    import llama_cpp

    path = gguf_models / "tiny-llama.gguf"
    e = Engine(gguf_models, gguf_models / "no-loras")
    e.load(ModelSpec(model=path.name, loader="llamacpp"))
    try:
        before = e.generate(PROMPT, GREEDY)
        got = e.score(TEXTS)
        llm = llama_cpp.Llama(str(path), n_ctx=256, logits_all=True, verbose=False, flash_attn=True)
        for text, scores in zip(TEXTS, got):
            ids = llm.tokenize(text.encode(), add_bos=llm._model.add_bos_token(), special=True)
            llm.reset()
            llm.eval(ids)
            logits = torch.tensor(np.array(llm.scores[: len(ids) - 1]), dtype=torch.float64)
            logp = torch.log_softmax(logits, -1).numpy()
            assert scores.ids == ids
            np.testing.assert_allclose(scores.logprobs, logp[np.arange(len(ids) - 1), ids[1:]], atol=1e-4)
        assert e.generate(PROMPT, GREEDY) == before  # scoring left no state behind (the KV cache was cleared)
    finally:
        e.unload()
