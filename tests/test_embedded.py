"""The embedded SmolLM2-135M-Instruct: with no --model the Engine converts the bundled GGUF once into a
safetensors folder (weights identical to what plain transformers reads from the GGUF), reuses it after,
and chats with the model's own chat template."""
import pytest
import torch

from webui.backends import embedded
from webui.engine import Engine
from webui.options.config import GenerationParams, ModelSpec


@pytest.fixture(scope="module")
def converted(embedded_folder):
    models_dir = embedded_folder.parent
    engine = Engine(models_dir)
    engine.load(ModelSpec(model="", loader="transformers"))
    return engine, models_dir


def test_embedded_folder_is_complete_safetensors(converted):
    _, models_dir = converted
    folder = models_dir / embedded.NAME
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert not any(n.endswith(".bin") for n in names)
    assert not [p for p in models_dir.iterdir() if p.name.startswith(".")]  # no leftover temp folder


def test_embedded_weights_equal_plain_transformers_gguf_read(converted):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    engine, _ = converted
    gguf = embedded.gguf_path()
    ref = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    ref_tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = engine.chat_prompt(messages)
    assert prompt == ref_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    ids = ref_tok(prompt, return_tensors="pt", add_special_tokens=False)
    out = ref.generate(**ids, do_sample=False, max_new_tokens=20)
    expected = ref_tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    reply = engine.generate(prompt, GenerationParams(temperature=0, max_new_tokens=20))
    assert reply == expected
    assert "Paris" in reply


def test_second_start_reuses_the_conversion(converted):
    _, models_dir = converted
    weights = models_dir / embedded.NAME / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    engine = Engine(models_dir)
    result = engine.load(ModelSpec(loader="transformers"))
    assert result.info.name == embedded.NAME
    assert weights.stat().st_mtime_ns == stamp
    assert "".join(engine.stream_chat([{"role": "user", "content": "Say hello."}],
                                      GenerationParams(temperature=0, max_new_tokens=8))).strip()
