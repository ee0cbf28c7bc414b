"""The llama.cpp loader against plain PEFT/transformers: a tiny Llama written to an f32 GGUF (the session's
`gguf_models`, with the same converter the export uses) gives transformers' greedy text and chat template;
Mistral and Qwen2 convert too; the base is described with transformers' names and shapes; a PEFT adapter is
converted to a GGUF LoRA once and reused; GGUF LoRA files are used as they are; sampling, seed and cancel
work; bad files are refused and the previous model stays; an exported GGUF with the adapter merged gives the
adapter's text with no adapter loaded (f32: exactly; the embedded SmolLM2 in Q4_K_M: its effect is still
there). The adapter behaviour every loader shares (PEFT equality, stacks, hot-swap, refusal, merge) is in
test_loader_contract.py."""
from __future__ import annotations

import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import GREEDY, PROMPT, converted_lora, llamacpp_logits, peft_reference, reference_greedy
from webui.engine import Engine
from webui.errors import BadInput, LoadFailed
from webui.export.hf_to_gguf import hf_to_gguf
from webui.export.run import export_model
from webui.options.config import GenerationParams, ModelSpec
from webui.testing.tiny_models import write_adapter

pytest.importorskip("llama_cpp")


@pytest.fixture
def loras(llama_loras) -> Path:
    """Adapters A (r=4, q/k/v/o), B (r=8, all-linear) and `other` (another base) for tiny-llama."""
    return llama_loras


@pytest.fixture
def engine(gguf_models, loras):
    e = Engine(gguf_models, loras)
    e.load(ModelSpec(model="tiny-llama.gguf"))  # loader auto: a .gguf goes to llama.cpp
    yield e
    e.unload()


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


def test_adapter_conversion_is_cached(engine, gguf_models, loras):
    """A PEFT adapter is converted to a GGUF LoRA once, kept beside its files and reused by the next load; when
    its files change it is converted again and the stale file removed."""
    expected, _ = peft_reference(gguf_models / "tiny-llama", {"A": (loras / "A", 1.0)})
    engine.set_adapters({"A": 1.0})
    assert engine.generate(PROMPT, GREEDY) == expected
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


def test_gguf_lora_file_used_as_is(engine, gguf_models, loras):
    """GGUF LoRA files in the loras folder (a folder holding one, or a bare .gguf file; here copies of A's
    conversion) are listed, checked and applied as they are."""
    from webui.adapters.files import read_adapter

    engine.set_adapters({"A": 1.0})
    expected = engine.generate(PROMPT, GREEDY)
    (loras / "A-gguf").mkdir()
    shutil.copy(converted_lora(loras, "A"), loras / "A-gguf" / "A.gguf")
    shutil.copy(converted_lora(loras, "A"), loras / "A-flat.gguf")
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
        with pytest.raises(BadInput, match="llama.cpp loader only"):
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
    # stopped within a few steps of the cancel, far from the 200 asked: pieces decoded while this consumer waited
    # for the CPU are already queued when it reads the first (3 seen on a loaded 2-core machine), and a tail of
    # undecoded bytes may follow
    assert len(pieces) <= 6, pieces


def test_load_errors_are_clear_and_keep_the_model(engine, loras, tmp_path):
    from webui.backends.llamacpp.loader import LlamaCppBackend

    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all")
    with pytest.raises(LoadFailed, match="not a GGUF file"):
        LlamaCppBackend.preflight(bad, ModelSpec())
    engine.set_adapters({"A": 1.0})  # makes sure A's GGUF LoRA exists
    with pytest.raises(LoadFailed, match="LoRA adapter, not a model"):
        engine.load(ModelSpec(model=str(converted_lora(loras, "A"))))
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
    from webui.export.gguf_writer import quantize

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
    base_logits, base_text = llamacpp_logits(engine, prompt), engine.generate(prompt, params)
    engine.set_adapters({"E": 0.01})
    adapter_logits, adapter_text = llamacpp_logits(engine, prompt), engine.generate(prompt, params)
    engine.unload()
    assert adapter_text != base_text

    out = export_model("", ["E"], [0.01], "gguf", tmp_path / "out", tmp_path / "models", loras, quant="Q4_K_M")
    merged = Engine(tmp_path / "models", loras)
    merged.load(ModelSpec(model=str(out)))
    merged_logits, merged_text = llamacpp_logits(merged, prompt), merged.generate(prompt, params)
    merged.unload()
    assert merged_text != base_text
    want, got = adapter_logits - base_logits, merged_logits - base_logits
    cosine = float(want @ got / np.linalg.norm(want) / np.linalg.norm(got))
    assert cosine > 0.8, f"merged Q4_K_M moves the logits unlike the adapter (cosine {cosine:.2f})"
