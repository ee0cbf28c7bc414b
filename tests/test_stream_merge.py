"""The tensor-by-tensor merge (webui/export/stream_merge.py) against PEFT's own `merge_and_unload`, computed here
on a float32 copy and saved in the base's dtype as the export does: the same tensors, for a bf16 base with a
weighted stack (rsLoRA, alpha_pattern), an embedding LoRA, a GPT-2 (fan_in_fan_out) base and a sharded output;
DoRA falls back to the loaded-model merge; an export that cannot fit is refused before it writes anything."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tests.helpers import bf16_copy
from webui.backends import machine
from webui.errors import Unsupported
from webui.export import stream_merge
from webui.export.run import export_model
from webui.testing.tiny_models import write_adapter


def _peft_merged(base, adapters: dict, dtype) -> dict[str, torch.Tensor]:
    """PEFT's merge of the weighted stack on a float32 copy, cast to `dtype`: the reference."""
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    names = list(adapters)
    peft = PeftModel.from_pretrained(model, str(adapters[names[0]][0]), adapter_name=names[0])
    for n in names[1:]:
        peft.load_adapter(str(adapters[n][0]), adapter_name=n)
    peft.base_model.set_adapter(names)
    for module in peft.modules():
        if isinstance(module, LoraLayer):
            for n in names:
                module.set_scale(n, adapters[n][1])
    merged = peft.merge_and_unload().to(dtype)
    return {k: v for k, v in merged.state_dict().items()}


def _saved(folder) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.fixture(scope="module")
def bf16_base(tiny_models, tmp_path_factory):
    return bf16_copy(tiny_models["llama"], tmp_path_factory.mktemp("bf16") / "tiny-llama-bf16")


def test_bf16_stack_equals_peft_merge(bf16_base, tmp_path):
    loras = tmp_path / "loras"
    write_adapter(bf16_base, loras / "A", r=4, alpha=8, seed=1)
    write_adapter(bf16_base, loras / "B", target_modules=["q_proj", "v_proj", "down_proj"], r=8, alpha=4, seed=2,
                  use_rslora=True, alpha_pattern={"v_proj": 16})
    write_adapter(bf16_base, loras / "E", target_modules=["embed_tokens", "o_proj"], r=2, alpha=2, seed=3)
    stack = {"A": (loras / "A", 1.0), "B": (loras / "B", 0.5), "E": (loras / "E", -0.7)}
    messages = []
    out = export_model(str(bf16_base), list(stack), [w for _, w in stack.values()], "safetensors",
                       tmp_path / "merged", bf16_base.parent, loras, progress=lambda f, m: messages.append(m))
    assert any("one tensor at a time" in m for m in messages)
    expected, ours = _peft_merged(bf16_base, stack, torch.bfloat16), _saved(out)
    assert set(ours) == set(expected) - {"lm_head.weight"} or set(ours) == set(expected)
    changed = 0
    for key, tensor in ours.items():
        assert tensor.dtype == torch.bfloat16
        torch.testing.assert_close(tensor, expected[key], atol=0, rtol=0, msg=key)
        changed += not torch.equal(tensor, _saved(bf16_base)[key])
    assert changed >= 15  # every linear layer of both blocks and the embedding
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"
    assert (out / "tokenizer.json").is_file() and json.loads((out / "lora-deck-export.json").read_text())["adapters"] \
        == {"A": 1.0, "B": 0.5, "E": -0.7}
    AutoModelForCausalLM.from_pretrained(str(out))  # plain transformers loads it, no adapter


def test_gpt2_fan_in_fan_out_and_shards(tiny_models, tmp_path, monkeypatch):
    base = tiny_models["gpt2"]
    loras = tmp_path / "loras"
    write_adapter(base, loras / "G", target_modules=["c_attn", "c_proj"], r=4, alpha=8, seed=5, fan_in_fan_out=True)
    monkeypatch.setattr(stream_merge, "SHARD_BYTES", 64 << 10)  # many small shards, and an index
    out = export_model(str(base), ["G"], [1.0], "safetensors", tmp_path / "merged", base.parent, loras)
    assert (out / stream_merge.INDEX).is_file() and len(list(out.glob("*.safetensors"))) > 2
    expected, ours = _peft_merged(base, {"G": (loras / "G", 1.0)}, torch.float32), _saved(out)
    for key, tensor in ours.items():
        torch.testing.assert_close(tensor, expected[key], atol=0, rtol=0, msg=key)
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert not any("lora" in k for k in model.state_dict())


def test_dora_falls_back_to_the_loaded_merge(tiny_models, tmp_path):
    base = tiny_models["llama"]
    loras = tmp_path / "loras"
    write_adapter(base, loras / "D", target_modules=["q_proj", "v_proj"], r=4, alpha=8, seed=4, use_dora=True)
    messages = []
    out = export_model(str(base), ["D"], [1.0], "safetensors", tmp_path / "merged", base.parent, loras,
                       progress=lambda f, m: messages.append(m))
    assert any("DoRA" in m and "loaded copy" in m for m in messages)
    expected, ours = _peft_merged(base, {"D": (loras / "D", 1.0)}, torch.float32), _saved(out)
    for key, tensor in ours.items():
        torch.testing.assert_close(tensor, expected[key], atol=1e-6, rtol=0, msg=key)


def test_an_export_that_cannot_fit_is_refused_up_front(tiny_models, tmp_path, monkeypatch):
    base = tiny_models["llama"]
    loras = tmp_path / "loras"
    write_adapter(base, loras / "A", seed=1)
    monkeypatch.setattr(machine, "available", lambda: 1000)
    with pytest.raises(Unsupported, match=r"the merge needs about \d+\.\d GB of memory and 0\.0 GB is free"):
        export_model(str(base), ["A"], [1.0], "safetensors", tmp_path / "merged", base.parent, loras)
    assert not (tmp_path / "merged").exists() and not list(tmp_path.glob(".*merged*"))


def test_an_adapter_for_another_base_is_refused(tiny_models, tmp_path):
    """The base's q_proj cut to half its rows: an adapter trained on the full base does not fit it."""
    from safetensors.torch import save_file

    from webui.errors import Incompatible

    loras = tmp_path / "loras"
    write_adapter(tiny_models["llama"], loras / "A", target_modules=["q_proj"], seed=1)
    src = tmp_path / "models" / "narrow"
    shutil.copytree(tiny_models["llama"], src)
    tensors = _saved(src)
    for k in [k for k in tensors if k.endswith("q_proj.weight")]:
        tensors[k] = tensors[k][: tensors[k].shape[0] // 2].contiguous()
    for f in src.glob("*.safetensors"):
        f.unlink()
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(Incompatible, match="A: model.layers.0.self_attn.q_proj changes a .* trained for another base"):
        export_model(str(src), ["A"], [1.0], "safetensors", tmp_path / "merged", src.parent, loras)
    assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize("quant", ["Q8_0", "Q4_K_M"])
def test_gguf_export_equals_the_merged_folder_converted_by_llama_cpp(bf16_base, tmp_path, quant):
    """Merging and converting tensor by tensor gives the same GGUF tensors as writing the merged folder as F32 and
    quantizing it with llama.cpp's quantizer (Q8_0 is written by gguf's quantizer, Q4_K_M by llama.cpp's from a
    BF16 file)."""
    import gguf
    import numpy as np

    from webui.export.gguf_writer import quantize
    from webui.export.hf_to_gguf import hf_to_gguf

    loras = tmp_path / "loras"
    write_adapter(bf16_base, loras / "A", r=4, alpha=8, seed=1)
    write_adapter(bf16_base, loras / "B", target_modules=["q_proj", "k_proj"], r=2, alpha=4, seed=2)
    messages = []
    ours = export_model(str(bf16_base), ["A", "B"], [1.0, 0.5], "gguf", tmp_path / "ours", bf16_base.parent, loras,
                        quant=quant, progress=lambda f, m: messages.append(m))
    assert any("one tensor at a time" in m for m in messages) and any("keeps" in m for m in messages)
    folder = export_model(str(bf16_base), ["A", "B"], [1.0, 0.5], "safetensors", tmp_path / "merged",
                          bf16_base.parent, loras)
    hf_to_gguf(folder, tmp_path / "merged.f32.gguf", "F32", name=bf16_base.name)
    quantize(tmp_path / "merged.f32.gguf", tmp_path / "reference.gguf", quant)
    expected = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "reference.gguf")).tensors}
    got = {t.name: t for t in gguf.GGUFReader(str(ours)).tensors}
    assert set(got) == set(expected)
    for name, t in expected.items():
        assert got[name].tensor_type == t.tensor_type, name
        assert np.array_equal(np.asarray(got[name].data), np.asarray(t.data)), name
