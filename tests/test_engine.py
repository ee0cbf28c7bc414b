"""The Engine as users rely on it: broken models are refused with the problem named while the loaded
model keeps answering; stop strings, cancel and concurrent callers behave; sampling is reproducible
with a seed."""
import json
import shutil
import threading
import time

import pytest
import torch

from webui.backends.hf.sampling import PresenceFrequencyPenalty, RowSampler
from webui.engine import Engine
from webui.errors import LoadFailed, NoModelLoaded, NotFound
from webui.options.config import GenerationParams, ModelSpec

PROMPT = "Hello! How can"
GREEDY = GenerationParams(temperature=0, max_new_tokens=16)


@pytest.fixture
def engine(scratch_models):
    e = Engine(scratch_models)
    e.load(ModelSpec(model="tiny-llama"))
    return e


def _break_missing_config(d):
    (d / "config.json").unlink()


def _break_bad_json(d):
    (d / "config.json").write_text("{ not json")


def _break_unknown_arch(d):
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "no-such-architecture"
    (d / "config.json").write_text(json.dumps(cfg))


def _break_no_weights(d):
    (d / "model.safetensors").unlink()


def _break_truncated_weights(d):
    w = d / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])


def _break_no_tokenizer(d):
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (d / f).unlink()


BROKEN = {
    "missing config": (_break_missing_config, "config.json is missing"),
    "bad json": (_break_bad_json, "config.json is not valid JSON"),
    "unknown architecture": (_break_unknown_arch, "config.json is broken"),
    "no weights": (_break_no_weights, "no weights file"),
    "truncated weights": (_break_truncated_weights, "corrupt or truncated"),
    "no tokenizer": (_break_no_tokenizer, "no tokenizer"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_model_is_refused_and_previous_stays(case, engine, scratch_models):
    before = engine.generate(PROMPT, GREEDY)
    broken = scratch_models / "broken"
    shutil.copytree(scratch_models / "tiny-llama", broken)
    damage, message = BROKEN[case]
    damage(broken)
    with pytest.raises(LoadFailed, match=message) as err:
        engine.load(ModelSpec(model="broken"))
    assert "broken" in str(err.value)  # names the model
    assert engine.loaded.name == "tiny-llama"
    assert engine.generate(PROMPT, GREEDY) == before


def test_load_failure_after_checks_restores_previous_model(engine, scratch_models):
    """Shapes that do not match the config pass the cheap checks but fail the real load."""
    before = engine.generate(PROMPT, GREEDY)
    broken = scratch_models / "wrong-shapes"
    shutil.copytree(scratch_models / "tiny-llama", broken)
    cfg = json.loads((broken / "config.json").read_text())
    cfg["intermediate_size"] = 48
    (broken / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LoadFailed, match="wrong-shapes"):
        engine.load(ModelSpec(model="wrong-shapes"))
    assert engine.loaded.name == "tiny-llama"
    assert engine.generate(PROMPT, GREEDY) == before


def test_missing_model_lists_what_exists(engine):
    with pytest.raises(NotFound, match="model not found: nope.*tiny-llama"):
        engine.load(ModelSpec(model="nope"))
    assert engine.loaded.name == "tiny-llama"


def test_no_model_loaded_is_a_clear_error(scratch_models):
    with pytest.raises(NoModelLoaded, match="no model is loaded"):
        Engine(scratch_models).generate(PROMPT, GREEDY)


def test_unload_then_load_again(engine):
    before = engine.generate(PROMPT, GREEDY)
    engine.unload()
    assert engine.loaded is None
    engine.load(ModelSpec(model="tiny-llama", dtype="float32"))
    assert engine.generate(PROMPT, GREEDY) == before


def test_stop_strings_cut_generate_and_stream(engine):
    full = engine.generate(PROMPT, GREEDY)
    stop = full[6:9]
    expected = full[: full.find(stop)]
    params = GenerationParams(temperature=0, max_new_tokens=16, stop=["never-appears", stop])
    assert engine.generate(PROMPT, params) == expected
    assert "".join(engine.stream(PROMPT, params)) == expected


def test_closing_a_stream_early_frees_the_model(engine):
    full = engine.generate(PROMPT, GREEDY)
    chunks = engine.stream(PROMPT, GenerationParams(temperature=0, max_new_tokens=200))
    next(chunks)
    chunks.close()
    assert engine.generate(PROMPT, GREEDY) == full  # would deadlock if the lock were still held


def test_cancel_event_ends_generation(engine):
    cancel = threading.Event()
    params = GenerationParams(temperature=0, max_new_tokens=200)
    n_tokens = 0
    text = ""
    for delta in engine.stream(PROMPT, params, cancel):
        text += delta
        cancel.set()
    n_tokens = engine.count_tokens(text)
    assert n_tokens < 50


def test_concurrent_callers_each_get_their_own_answer(engine):
    prompts = ["Hello! How can", "The quick brown", "One, two, three", "Models, tokens"]
    expected = {p: engine.generate(p, GREEDY) for p in prompts}
    got = {}

    def worker(p):
        got[p] = "".join(engine.stream(p, GREEDY))

    threads = [threading.Thread(target=worker, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert got == expected


def test_model_change_waits_for_running_generation(engine, monkeypatch):
    """A load asked for while a request generates waits for it: the request runs to its end on the model it
    started on, and only then is the model replaced."""
    from webui.backends.hf import continuous

    events, gate, stepping = [], threading.Event(), threading.Event()
    real_step = continuous.HfDecoder.step

    def step(self):  # the decode steps wait for the gate: the request is mid-generation meanwhile
        stepping.set()
        assert gate.wait(30)
        return real_step(self)

    monkeypatch.setattr(continuous.HfDecoder, "step", step)
    handle = engine.submit(PROMPT, GenerationParams(temperature=0, max_new_tokens=8))
    assert stepping.wait(30)

    def reload():
        engine.load(ModelSpec(model="tiny-llama"))
        events.append("loaded")

    t = threading.Thread(target=reload)
    t.start()
    time.sleep(0.5)
    events.append("generation ends")
    gate.set()
    text = handle.text()
    t.join(60)
    assert events == ["generation ends", "loaded"]
    # the request ended whole, on the model it started on (the reload is the same model: the same text)
    assert handle.finish_reason in ("stop", "length")
    assert text == engine.generate(PROMPT, GenerationParams(temperature=0, max_new_tokens=8))


def test_seeded_sampling_is_reproducible(engine):
    params = GenerationParams(temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=16, seed=1234)
    first = engine.generate(PROMPT, params)
    assert engine.generate(PROMPT, params) == first
    assert "".join(engine.stream(PROMPT, params)) == first


def test_a_whole_number_temperature_samples():
    """The Parameters tab sends a typed 1 as the int 1, which transformers' temperature warper refused."""
    sampler = RowSampler(GenerationParams(temperature=1, seed=7), prompt_len=1)
    assert not sampler.greedy and sampler.processors


def test_presence_and_frequency_penalties_follow_openai_definition():
    scores = torch.zeros(1, 5)
    ids = torch.tensor([[4, 1, 1, 3]])  # prompt = [4]; generated = [1, 1, 3]
    out = PresenceFrequencyPenalty(presence=0.5, frequency=0.25, prompt_len=1)(ids, scores)
    assert out.tolist() == [[0.0, -(0.5 + 2 * 0.25), 0.0, -(0.5 + 0.25), 0.0]]


def test_sampling_settings_change_the_output(engine):
    """Every sampler reaches generate: a strong penalty changes the greedy text."""
    base = engine.generate(PROMPT, GREEDY)
    penalized = engine.generate(PROMPT, GenerationParams(temperature=0, max_new_tokens=16, frequency_penalty=2.0,
                                                         presence_penalty=2.0))
    assert penalized != base
    rep = engine.generate(PROMPT, GenerationParams(temperature=0, max_new_tokens=16, repetition_penalty=2.0))
    assert rep != base
