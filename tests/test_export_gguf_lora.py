"""Adapters leaving LoRA Deck unmerged, for llama.cpp and Ollama: `export --format gguf-lora` loaded by plain
llama-cpp-python next to the original GGUF base (`Llama(lora_path=...)`) gives the same greedy text as the llama.cpp
loader's run-time conversion and as PEFT on the transformers model — for an rsLoRA adapter with alpha_pattern /
rank_pattern and for a weighted stack of adapters of different ranks; f16 / q8_0 files load and stay close to
f32; the merged GGUF export of the rsLoRA stack equals PEFT too; LoRA biases are refused; `export --format
ollama` writes a folder whose Modelfile, parsed back, names files that exist, carries the ChatML template and
stop tokens (and SmolLM2's default system prompt)."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from peft import PeftModel
from peft.tuners.lora import LoraLayer

from tests.helpers import GREEDY, PROMPT, _greedy, _load
from webui.cli import main
from webui.engine import Engine
from webui.errors import BadInput
from webui.export.run import export_model
from webui.options.config import ModelSpec
from webui.testing.tiny_models import write_adapter

llama_cpp = pytest.importorskip("llama_cpp")

STACK = {"A": 1.0, "RS": 0.5}


@pytest.fixture(scope="module")
def loras(llama_loras, gguf_models, tmp_path_factory) -> Path:
    """The session's A (r=4, q/k/v/o, alpha 8) beside RS: rsLoRA, r=8, all-linear, alpha_pattern on q_proj (its
    B rows are permuted by llama.cpp's converter too) and rank_pattern giving v_proj r=2."""
    d = tmp_path_factory.mktemp("gguf-lora-loras")
    shutil.copytree(llama_loras / "A", d / "A", ignore=shutil.ignore_patterns("*.gguf"))
    write_adapter(gguf_models / "tiny-llama", d / "RS", target_modules="all-linear", r=8, alpha=6, seed=9,
                  use_rslora=True, alpha_pattern={"q_proj": 3}, rank_pattern={"v_proj": 2})
    return d


def peft_stack_greedy(base: Path, loras: Path, weights: dict) -> str:
    """Plain PEFT's greedy text with every adapter active at once, each layer's scale times its weight."""
    tok, model = _load(base)
    names = list(weights)
    peft = PeftModel.from_pretrained(model, str(loras / names[0]), adapter_name=names[0])
    for n in names[1:]:
        peft.load_adapter(str(loras / n), adapter_name=n)
    peft.base_model.set_adapter(names)
    for module in peft.modules():
        if isinstance(module, LoraLayer):
            for n, w in weights.items():
                module.set_scale(n, w)
    return _greedy(tok, peft.eval(), PROMPT, 12)


def runtime_greedy(gguf_models: Path, loras: Path, weights: dict) -> str:
    engine = Engine(gguf_models, loras)
    engine.load(ModelSpec(model="tiny-llama.gguf"))
    engine.set_adapters(weights)
    text = engine.generate(PROMPT, GREEDY)
    engine.unload()
    return text


def llama_cpp_run(base: Path, lora: Path | None) -> tuple[str, np.ndarray]:
    """Plain llama-cpp-python with the GGUF LoRA file next to the base: 12 greedy tokens (decoded as the
    llama.cpp loader decodes them) and the last prompt position's logits."""
    llm = llama_cpp.Llama(model_path=str(base), lora_path=str(lora) if lora else None, n_ctx=256, n_threads=2,
                          verbose=False)
    prompt = llm.tokenize(PROMPT.encode())
    ids = []
    for token in llm.generate(prompt, temp=0.0):
        if token == llm.token_eos() or len(ids) == 12:
            break
        ids.append(token)
    llm.reset()
    llm.eval(prompt)
    logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),)).copy()
    text = llm.detokenize(ids, special=True).decode("utf-8", "replace")
    llm.close()
    return text, logits


@pytest.mark.parametrize("weights", [{"RS": 1.0}, STACK], ids=["rslora-patterns", "weighted-stack"])
def test_gguf_lora_export_equals_runtime_and_peft(weights, gguf_models, loras, tmp_path):
    expected = peft_stack_greedy(gguf_models / "tiny-llama", loras, weights)
    assert runtime_greedy(gguf_models, loras, weights) == expected
    out = export_model("tiny-llama.gguf", list(weights), list(weights.values()), "gguf-lora", tmp_path, gguf_models,
                       loras)
    assert out.parent == tmp_path and out.name == f"{'+'.join(weights)}.F32.gguf"
    text, _ = llama_cpp_run(gguf_models / "tiny-llama.gguf", out)
    base_text, _ = llama_cpp_run(gguf_models / "tiny-llama.gguf", None)
    assert text == expected and text != base_text


def test_outtypes_and_cli(gguf_models, loras, tmp_path, capsys):
    import gguf

    files = {}
    for outtype in ("f32", "f16", "q8_0"):
        assert main(["export", "--format", "gguf-lora", "--outtype", outtype, "--model", "tiny-llama.gguf",
                     "--lora", "A", "RS", "--weights", "1", "0.5", "--models-dir", str(gguf_models), "--loras-dir",
                     str(loras), "--out", str(tmp_path / f"stack-{outtype}.gguf")]) == 0
        files[outtype] = Path(capsys.readouterr().out.strip())
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(files["q8_0"])).tensors}
    # A (r, in=32) packs into Q8_0 blocks of 32; B (out, r=12) cannot and falls back to F16, as llama.cpp's does
    assert types["blk.0.attn_q.weight.lora_a"] == "Q8_0" and types["blk.0.attn_q.weight.lora_b"] == "F16"
    assert {t.tensor_type.name for t in gguf.GGUFReader(str(files["f16"])).tensors} == {"F16"}
    _, reference = llama_cpp_run(gguf_models / "tiny-llama.gguf", files["f32"])
    _, plain = llama_cpp_run(gguf_models / "tiny-llama.gguf", None)
    for outtype in ("f16", "q8_0"):
        _, logits = llama_cpp_run(gguf_models / "tiny-llama.gguf", files[outtype])
        moved = np.linalg.norm(reference - plain)
        assert np.linalg.norm(logits - reference) < 0.05 * moved, outtype
    assert main(["export", "--format", "gguf-lora", "--model", "tiny-llama", "--lora", "A", "--models-dir",
                 str(gguf_models), "--loras-dir", str(loras), "--out", str(tmp_path / "x.gguf")]) == 1
    assert "GGUF base" in capsys.readouterr().err


def test_merged_gguf_of_rslora_stack_equals_peft(gguf_models, loras, tmp_path):
    expected = peft_stack_greedy(gguf_models / "tiny-llama", loras, STACK)
    out = export_model("tiny-llama.gguf", list(STACK), list(STACK.values()), "gguf", tmp_path / "m.gguf",
                       gguf_models, loras, quant="F32")
    text, _ = llama_cpp_run(out, None)
    assert text == expected


def test_lora_bias_is_refused(gguf_models, tmp_path):
    write_adapter(gguf_models / "tiny-llama", tmp_path / "biased", target_modules=["q_proj"], r=4, lora_bias=True)
    with pytest.raises(BadInput, match="LoRA biases"):
        export_model("tiny-llama.gguf", ["biased"], [1.0], "gguf-lora", tmp_path / "out", gguf_models, tmp_path)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def parse_modelfile(folder: Path) -> dict:
    """FROM / ADAPTER / TEMPLATE / SYSTEM (triple-quoted values) and the PARAMETER stop values of a Modelfile."""
    text = (folder / "Modelfile").read_text()
    found: dict = {"stop": re.findall(r'^PARAMETER stop "(.*)"$', text, re.MULTILINE)}
    for key in ("FROM", "ADAPTER"):
        m = re.search(rf"^{key} (\S+)$", text, re.MULTILINE)
        found[key] = (folder / m.group(1)).resolve() if m else None
    for key in ("TEMPLATE", "SYSTEM"):
        m = re.search(rf'^{key} """(.*?)"""$', text, re.MULTILINE | re.DOTALL)
        found[key] = m.group(1) if m else None
    return found


def test_ollama_folder(gguf_models, loras, tmp_path):
    out = export_model("tiny-llama.gguf", ["A"], [1.0], "ollama", tmp_path / "ollama", gguf_models, loras)
    mf = parse_modelfile(out)
    assert mf["FROM"] == (out / "tiny-llama.gguf").resolve() and mf["FROM"].is_file()
    assert mf["FROM"].read_bytes() == (gguf_models / "tiny-llama.gguf").read_bytes()
    assert mf["ADAPTER"].is_file() and mf["ADAPTER"].parent == out.resolve()
    assert "{{ .Content }}" in mf["TEMPLATE"] and "<|im_start|>user\n" in mf["TEMPLATE"]
    assert "<|im_end|>" in mf["stop"] and mf["SYSTEM"] is None
    text, _ = llama_cpp_run(mf["FROM"], mf["ADAPTER"])  # the folder's files run as the adapter does
    assert text == runtime_greedy(gguf_models, loras, {"A": 1.0})
    with pytest.raises(BadInput, match="not an empty folder"):
        export_model("tiny-llama.gguf", ["A"], [1.0], "ollama", out, gguf_models, loras)


def test_ollama_folder_of_the_embedded_model(tmp_path):
    """SmolLM2's template adds a system prompt when there is none: it becomes the Modelfile's SYSTEM default."""
    out = export_model("", [], [], "ollama", tmp_path / "smol", tmp_path / "models", tmp_path / "loras")
    mf = parse_modelfile(out)
    assert mf["FROM"].is_file() and mf["ADAPTER"] is None
    assert mf["TEMPLATE"].startswith("{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}")
    assert mf["SYSTEM"] == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    assert mf["stop"] == ["<|im_end|>"]


def test_go_template_pieces_render_the_jinja_template():
    """The pieces the Go template is built from, rendered as Go renders them, give transformers' rendering of a
    ChatML template, the reason the exporter trusts the translation (and refuses one that does not match)."""
    from transformers.utils.chat_template_utils import render_jinja_template

    from webui.export.ollama_template import FORMATS, render_like_go, translate
    from webui.testing.tiny_models import CHAT_TEMPLATE

    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    jinja, _ = render_jinja_template([msgs], chat_template=CHAT_TEMPLATE, add_generation_prompt=True)
    assert render_like_go(FORMATS[0], msgs, None) == jinja[0]
    found, _ = translate(CHAT_TEMPLATE)
    assert found.format == "ChatML"
    odd = "{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}<|im_start|>"
    assert translate(odd)[0] is None
