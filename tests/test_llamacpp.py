"""The llama.cpp loader against plain PEFT/transformers: a tiny Llama written to an f32 GGUF here (with the
same converter the export uses) must give transformers' greedy text; with a PEFT adapter (converted to a
GGUF LoRA automatically) PEFT's text; a weighted stack PEFT's add_weighted_adapter("cat"); switching
A→B→none→A happens on one loaded model; an adapter for another base is refused and nothing changes; an
exported GGUF with the adapter merged gives the adapter's text with no adapter loaded (f32: exactly; the
embedded SmolLM2 in Q4_K_M: its effect is still there)."""
from __future__ import annotations

import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import reference_greedy
from tests.test_adapters import GREEDY, PROMPT, peft_reference
from tests.tiny_models import write_adapter
from webui.adapters.gguf_convert import hf_to_gguf
from webui.adapters.files import AdapterError
from webui.backends.base import ModelLoadError
from webui.config import GenerationParams, ModelSpec
from webui.engine import AdapterIncompatible, Engine
from webui.export import export_model

pytest.importorskip("llama_cpp")


@pytest.fixture(scope="module")
def gguf_models(tiny_models, tmp_path_factory) -> Path:
    """A models dir holding tiny-llama.gguf (f32) and the tiny-llama transformers folder it came from."""
    d = tmp_path_factory.mktemp("gguf-models")
    shutil.copytree(tiny_models["llama"], d / "tiny-llama")
    hf_to_gguf(d / "tiny-llama", d / "tiny-llama.gguf")
    return d


@pytest.fixture(scope="module")
def loras(gguf_models, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("gguf-loras")
    base = gguf_models / "tiny-llama"
    # q/k included on purpose: their B rows must follow llama.cpp's q/k permutation
    write_adapter(base, d / "A", target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], r=4, alpha=8, seed=1)
    write_adapter(base, d / "B", target_modules="all-linear", r=8, alpha=16, seed=2)
    return d


@pytest.fixture
def engine(gguf_models, loras):
    e = Engine(gguf_models, loras)
    e.load(ModelSpec(model="tiny-llama.gguf"))  # loader auto: a .gguf goes to llama.cpp
    yield e
    e.unload()


def last_logits(engine: Engine, prompt: str = PROMPT) -> np.ndarray:
    import llama_cpp

    llm = engine._backend.llm
    llm.reset()
    llm.eval(engine._backend._tokens(prompt))
    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),)).copy()


def f32_kv_logits(model: Path, adapters: list[tuple[Path, float]], prompt: str = PROMPT) -> np.ndarray:
    """Last-position logits from llama-cpp-python directly, with an f32 KV cache and GGUF LoRA files
    applied through llama_set_adapters_lora. llama.cpp's default KV cache is f16, which alone moves the
    tiny model's logits by up to ~0.15 (measured) once an adapter makes its keys/values large; in f32
    the difference from PEFT is rounding only."""
    import ctypes

    import llama_cpp

    llm = llama_cpp.Llama(str(model), n_ctx=256, verbose=False, type_k=llama_cpp.GGML_TYPE_F32,
                          type_v=llama_cpp.GGML_TYPE_F32)
    pointers = [llama_cpp.llama_adapter_lora_init(llm.model, str(p).encode()) for p, _ in adapters]
    n = len(adapters)
    assert llama_cpp.llama_set_adapters_lora(llm.ctx, (llama_cpp.llama_adapter_lora_p_ctypes * n)(*pointers), n,
                                             (ctypes.c_float * n)(*(w for _, w in adapters))) == 0
    llm.reset()
    llm.eval(llm.tokenize(prompt.encode(), add_bos=False, special=True))
    logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),)).copy()
    llm.close()
    return logits


def converted(loras: Path, name: str) -> Path:
    return next((loras / name).glob("adapter.*.gguf"))


def test_gguf_base_matches_transformers(engine, gguf_models):
    assert engine.loaded.loader == "llamacpp"
    assert engine.capabilities.adapters and engine.capabilities.adapter_stack and not engine.capabilities.merge
    assert engine.generate(PROMPT, GREEDY) == reference_greedy(gguf_models / "tiny-llama", PROMPT, 12)
    # the chat template stored in the GGUF renders as transformers renders it
    from transformers import AutoTokenizer

    msgs = [{"role": "user", "content": "hi"}]
    tok = AutoTokenizer.from_pretrained(str(gguf_models / "tiny-llama"))
    assert engine.chat_prompt(msgs) == tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


@pytest.mark.parametrize("arch", ["mistral", "qwen2"])
def test_other_architectures(arch, tiny_models, tmp_path):
    """Mistral (a Llama to llama.cpp: q/k permuted) and Qwen2 (NEOX rope: not permuted, q/k/v biases)."""
    models, loras = tmp_path / "models", tmp_path / "loras"
    models.mkdir()
    hf_to_gguf(tiny_models[arch], models / f"tiny-{arch}.gguf")
    write_adapter(tiny_models[arch], loras / "a", target_modules="all-linear", r=4, alpha=8, seed=4)
    expected, _ = peft_reference(tiny_models[arch], {"a": (loras / "a", 1.0)})
    engine = Engine(models, loras)
    engine.load(ModelSpec(model=f"tiny-{arch}.gguf"))
    assert engine.generate(PROMPT, GREEDY) == reference_greedy(tiny_models[arch], PROMPT, 12)
    engine.set_adapters({"a": 1.0})
    assert engine.generate(PROMPT, GREEDY) == expected
    engine.unload()


def test_describe_base_uses_hf_names_and_shapes(engine, gguf_models):
    from transformers import AutoModelForCausalLM

    from webui.adapters.targets import describe_base

    hf = describe_base(AutoModelForCausalLM.from_pretrained(str(gguf_models / "tiny-llama")), "tiny-llama")
    ours = engine._backend.describe_base()
    assert ours.name == "tiny-llama" and ours.model_type == "llama" and ours.num_layers == 2
    linear = {n: l for n, l in hf.layers.items() if l.kind == "linear"}
    assert {n: l for n, l in ours.layers.items() if l.kind == "linear"} == linear


def test_adapter_equals_peft_and_conversion_is_cached(engine, gguf_models, loras):
    base = gguf_models / "tiny-llama"
    expected, ref_logits = peft_reference(base, {"A": (loras / "A", 1.0)})
    base_text = engine.generate(PROMPT, GREEDY)
    assert engine.adapter_report("A").verdict == "ok", engine.adapter_report("A").text()
    assert engine.set_adapters({"A": 1.0}) == {"A": 1.0}
    assert engine.generate(PROMPT, GREEDY) == expected != base_text
    diff = np.abs(f32_kv_logits(gguf_models / "tiny-llama.gguf", [(converted(loras, "A"), 1.0)])
                  - ref_logits.numpy()).max()
    assert diff < 1e-3, f"max |logit difference| vs PEFT: {diff}"

    cached = sorted((loras / "A").glob("adapter.*.gguf"))
    assert len(cached) == 1
    stamp = cached[0].stat().st_mtime_ns
    other = Engine(gguf_models, loras)
    other.load(ModelSpec(model="tiny-llama.gguf"))
    other.set_adapters({"A": 1.0})
    assert cached[0].stat().st_mtime_ns == stamp  # reused, not converted again
    assert other.generate(PROMPT, GREEDY) == expected
    (loras / "A" / "adapter_model.safetensors").touch()  # changed files: converted again, stale file removed
    other.set_adapters({"A": 1.0})
    again = sorted((loras / "A").glob("adapter.*.gguf"))
    assert len(again) == 1 and again != cached and other.generate(PROMPT, GREEDY) == expected
    other.unload()


def test_weighted_stack_equals_peft_cat(engine, gguf_models, loras):
    base = gguf_models / "tiny-llama"
    for weights in ({"A": 1.0, "B": 0.5}, {"A": 0.3, "B": -0.7}):
        expected, ref_logits = peft_reference(base, {n: (loras / n, w) for n, w in weights.items()})
        engine.set_adapters(weights)
        assert engine.generate(PROMPT, GREEDY) == expected
        files = [(converted(loras, n), w) for n, w in weights.items()]
        diff = np.abs(f32_kv_logits(gguf_models / "tiny-llama.gguf", files) - ref_logits.numpy()).max()
        assert diff < 1e-3, f"max |logit difference| vs PEFT for {weights}: {diff}"


def test_switch_without_reloading(engine, gguf_models, loras):
    base = gguf_models / "tiny-llama"
    base_text = engine.generate(PROMPT, GREEDY)
    a_text, _ = peft_reference(base, {"A": (loras / "A", 1.0)})
    b_text, _ = peft_reference(base, {"B": (loras / "B", 1.0)})
    assert len({base_text, a_text, b_text}) == 3
    llm = engine._backend.llm
    outputs = []
    for active in ({"A": 1.0}, {"B": 1.0}, {}, {"A": 1.0}):
        engine.set_adapters(active)
        outputs.append(engine.generate(PROMPT, GREEDY))
    assert outputs == [a_text, b_text, base_text, a_text]
    assert engine._backend.llm is llm and set(engine._backend.adapters_loaded) == {"A", "B"}
    engine.clear_adapters()
    assert engine.generate(PROMPT, GREEDY) == base_text


def test_adapter_for_another_base_is_refused(engine, loras, embedded_folder, tmp_path):
    write_adapter(embedded_folder, loras / "smol", target_modules=["q_proj", "v_proj"], r=4, seed=5)
    engine.set_adapters({"A": 1.0})
    before = engine.generate(PROMPT, GREEDY)
    with pytest.raises(AdapterIncompatible) as err:
        engine.set_adapters({"smol": 1.0})
    assert "576" in str(err.value) or "layers" in str(err.value)  # names the shape / layer mismatch
    assert engine.active_adapters == {"A": 1.0}
    assert engine.generate(PROMPT, GREEDY) == before
    shutil.rmtree(loras / "smol")


def test_gguf_lora_file_used_as_is(engine, gguf_models, loras):
    """GGUF LoRA files in the loras folder (a folder holding one, or a bare .gguf file; here copies of A's
    conversion) are listed, checked and applied as they are."""
    from webui.adapters.files import read_adapter

    engine.set_adapters({"A": 1.0})
    expected = engine.generate(PROMPT, GREEDY)
    (loras / "A-gguf").mkdir()
    shutil.copy(converted(loras, "A"), loras / "A-gguf" / "A.gguf")
    shutil.copy(converted(loras, "A"), loras / "A-flat.gguf")
    try:
        assert {"A-gguf", "A-flat.gguf"} <= set(engine.list_adapters())
        files = read_adapter(loras / "A-gguf")
        assert files.format == "gguf" and files.config["r"] == 4 and files.config["lora_alpha"] == 8
        assert sorted(files.config["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]
        for name in ("A-gguf", "A-flat.gguf"):
            assert engine.adapter_report(name).verdict == "ok", engine.adapter_report(name).text()
            engine.set_adapters({name: 1.0})
            assert engine.generate(PROMPT, GREEDY) == expected
        assert not list((loras / "A-gguf").glob("adapter.*.gguf"))  # used as is: nothing converted
        hf = Engine(gguf_models, loras)  # the transformers loader refuses it (llama.cpp tensor layout)
        hf.load(ModelSpec(model="tiny-llama"))
        with pytest.raises(AdapterError, match="llama.cpp loader only"):
            hf.set_adapters({"A-gguf": 1.0})
        assert hf.active_adapters == {}
    finally:
        engine.clear_adapters()
        shutil.rmtree(loras / "A-gguf")
        (loras / "A-flat.gguf").unlink()


def test_sampling_seed_and_cancel(engine):
    params = GenerationParams(temperature=0.9, top_p=0.9, top_k=20, min_p=0.05, repetition_penalty=1.1,
                              presence_penalty=0.2, frequency_penalty=0.1, seed=7, max_new_tokens=16)
    assert engine.generate(PROMPT, params) == engine.generate(PROMPT, params)
    assert "".join(engine.stream(PROMPT, GREEDY)) == engine.generate(PROMPT, GREEDY)
    cancel = threading.Event()
    pieces = []
    for delta in engine.stream(PROMPT, GenerationParams(temperature=0, max_new_tokens=200), cancel):
        pieces.append(delta)
        cancel.set()
    assert len(pieces) <= 2  # stopped right after the cancel (a tail of undecoded bytes may follow)


def test_load_errors_are_clear_and_keep_the_model(engine, loras, tmp_path):
    from webui.backends.llamacpp import LlamaCppBackend

    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all")
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        LlamaCppBackend.preflight(bad, ModelSpec())
    engine.set_adapters({"A": 1.0})  # makes sure A's GGUF LoRA exists
    with pytest.raises(ModelLoadError, match="LoRA adapter, not a model"):
        engine.load(ModelSpec(model=str(converted(loras, "A"))))
    assert engine.loaded.name == "tiny-llama.gguf"  # the previous model is loaded again
    assert engine.generate(PROMPT, GREEDY)


def test_export_gguf_f32_gives_the_adapter_output(gguf_models, loras, tmp_path):
    expected, _ = peft_reference(gguf_models / "tiny-llama", {"A": (loras / "A", 1.0), "B": (loras / "B", 0.5)})
    # from the transformers folder (PEFT merge, our HF→GGUF writer) and from the GGUF itself (merge into GGUF)
    from_hf = export_model("tiny-llama", ["A", "B"], [1.0, 0.5], "gguf", tmp_path / "out", gguf_models, loras,
                           quant="F32")
    from_gguf = export_model("tiny-llama.gguf", ["A", "B"], [1.0, 0.5], "gguf", tmp_path / "merged.gguf",
                             gguf_models, loras, quant="F32")
    assert from_hf.parent == tmp_path / "out" and from_hf.suffix == ".gguf" and from_gguf == tmp_path / "merged.gguf"
    for path in (from_hf, from_gguf):
        e = Engine(gguf_models, loras)
        e.load(ModelSpec(model=str(path)))
        assert e.active_adapters == {}
        assert e.generate(PROMPT, GREEDY) == expected
        e.unload()


def test_export_warns_when_quantization_erases_the_adapter(gguf_models, loras, tmp_path):
    """A base already on the Q8_0 grid plus a change far below one grid step rounds back to the base."""
    from webui.export_gguf import quantize

    models = tmp_path / "models"
    models.mkdir()
    quantize(gguf_models / "tiny-llama.gguf", models / "tiny-q8.gguf", "Q8_0")
    messages = []
    export_model("tiny-q8.gguf", ["A"], [1e-4], "gguf", tmp_path / "tiny.gguf", models, loras, quant="Q8_0",
                 progress=lambda f, m: messages.append(m))
    assert any(m.startswith("warning:") and "erases" in m for m in messages), messages
    messages.clear()
    export_model("tiny-q8.gguf", ["A"], [1.0], "gguf", tmp_path / "tiny2.gguf", models, loras, quant="Q8_0",
                 progress=lambda f, m: messages.append(m))
    assert not any(m.startswith("warning:") for m in messages), messages


def test_cli_export_gguf(gguf_models, loras, tmp_path, capsys):
    from webui.cli import main

    out = tmp_path / "cli"
    assert main(["export", "--model", "tiny-llama.gguf", "--lora", "A", "--format", "gguf", "--quant", "Q8_0",
                 "--out", str(out), "--models-dir", str(gguf_models), "--loras-dir", str(loras)]) == 0
    written = Path(capsys.readouterr().out.strip())
    assert written.parent == out and written.name == "tiny-llama+A.Q8_0.gguf" and written.is_file()
    assert main(["export", "--model", "tiny-llama.gguf", "--format", "gguf", "--quant", "Q9_9", "--out",
                 str(out), "--models-dir", str(gguf_models), "--loras-dir", str(loras)]) == 1


def test_embedded_q4_export_keeps_the_adapter(embedded_folder, tmp_path):
    """The embedded SmolLM2 (Q4_1) with an adapter merged and quantized to Q4_K_M, loaded with no adapter,
    moves its logits the way the adapter applied at run time does, and changes the greedy reply."""
    loras = tmp_path / "loras"
    write_adapter(embedded_folder, loras / "E", target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], r=4, seed=3)
    engine = Engine(tmp_path / "models", loras)
    engine.load(ModelSpec())  # the embedded model, on llama.cpp
    assert engine.loaded.loader == "llamacpp"
    prompt = engine.chat_prompt([{"role": "user", "content": "What is the capital of France?"}])
    params = GenerationParams(temperature=0, max_new_tokens=12)
    base_logits, base_text = last_logits(engine, prompt), engine.generate(prompt, params)
    engine.set_adapters({"E": 0.01})
    adapter_logits, adapter_text = last_logits(engine, prompt), engine.generate(prompt, params)
    engine.unload()
    assert adapter_text != base_text

    out = export_model("", ["E"], [0.01], "gguf", tmp_path / "out", tmp_path / "models", loras, quant="Q4_K_M")
    merged = Engine(tmp_path / "models", loras)
    merged.load(ModelSpec(model=str(out)))
    merged_logits, merged_text = last_logits(merged, prompt), merged.generate(prompt, params)
    merged.unload()
    assert merged_text != base_text
    want, got = adapter_logits - base_logits, merged_logits - base_logits
    cosine = float(want @ got / np.linalg.norm(want) / np.linalg.norm(got))
    assert cosine > 0.8, f"merged Q4_K_M moves the logits unlike the adapter (cosine {cosine:.2f})"
