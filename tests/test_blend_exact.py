"""Blends that equal the weighted stack they came from, for every LoRA variant, or are refused with the reason:
two rsLoRA adapters of different ranks (one with alpha_pattern / rank_pattern) blended with `python -m webui
blend` give plain PEFT's stack logits (set_adapter over both, set_scale per weight) within 1e-5, where PEFT's
own add_weighted_adapter is far off; svd at full rank folds the scale right too; ties is written as the
approximation it is, with its deviation recorded; DoRA and lora_bias blends are refused and write nothing;
the safetensors export (PEFT's merge) of the rsLoRA stack equals PEFT's merge."""
from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.helpers import PROMPT
from webui.cli import main
from webui.engine import Engine
from webui.errors import BadInput
from webui.export.run import export_model
from webui.options.config import ModelSpec
from webui.testing.tiny_models import write_adapter

STACK = {"R4": 1.0, "R8": -0.6}


@pytest.fixture(scope="module")
def rs_loras(tiny_models, tmp_path_factory):
    """rsLoRA adapters for tiny-llama: R4 (r=4, attention, alpha_pattern on v_proj) and R8 (r=8, all-linear,
    rank_pattern giving o_proj r=2), small alphas so that the stack moves the logits without swamping them."""
    loras = tmp_path_factory.mktemp("rs-loras")
    base = tiny_models["llama"]
    write_adapter(base, loras / "R4", target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], r=4, alpha=0.5,
                  seed=5, use_rslora=True, alpha_pattern={"v_proj": 0.25})
    write_adapter(base, loras / "R8", target_modules="all-linear", r=8, alpha=0.4, seed=6, use_rslora=True,
                  rank_pattern={"o_proj": 2})
    return base, loras


def _peft(base, adapters: dict, dtype=torch.float64):
    """(tokenizer, PeftModel) holding each adapter of {name: folder}: plain PEFT, in float64, so that comparisons
    measure the adapters and not float32's summation order (which alone moves these logits by ~1e-5)."""
    tok = AutoTokenizer.from_pretrained(str(base))
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=dtype)
    names = list(adapters)
    peft = PeftModel.from_pretrained(model, str(adapters[names[0]]), adapter_name=names[0])
    for n in names[1:]:
        peft.load_adapter(str(adapters[n]), adapter_name=n)
    return tok, peft.eval()


def _logits(tok, model) -> torch.Tensor:
    with torch.no_grad():
        return model(**tok(PROMPT, return_tensors="pt")).logits[0]


def _stack_logits(base, loras, weights: dict) -> torch.Tensor:
    """Plain PEFT's weighted stack: every adapter active at once, each layer's scale times its weight."""
    tok, peft = _peft(base, {n: loras / n for n in weights})
    peft.base_model.set_adapter(list(weights))
    for module in peft.modules():
        if isinstance(module, LoraLayer):
            for n, w in weights.items():
                module.set_scale(n, w)
    return _logits(tok, peft)


def _adapter_logits(base, folder) -> torch.Tensor:
    tok, peft = _peft(base, {"x": folder})
    return _logits(tok, peft)


def test_cli_blend_of_rslora_adapters_equals_the_stack(rs_loras, capsys):
    base, loras = rs_loras
    stack = _stack_logits(base, loras, STACK)
    plain = _logits(AutoTokenizer.from_pretrained(str(base)),
                    AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float64))
    assert float((stack - plain).abs().max()) > 0.1, "the stack must move the logits for this test to mean anything"

    # PEFT's own add_weighted_adapter (issue 3761): an rsLoRA blend comes out sqrt(12) times too strong
    tok, peft = _peft(base, {n: loras / n for n in STACK})
    peft.add_weighted_adapter(list(STACK), list(STACK.values()), "mix", combination_type="cat")
    peft.set_adapter("mix")
    assert float((_logits(tok, peft) - stack).abs().max()) > 1e-2

    assert main(["blend", "--lora", "R4", "--lora", "R8", "--weights", "1", "-0.6", "--model", base.name,
                 "--models-dir", str(base.parent), "--loras-dir", str(loras), "--out", "R4R8"]) == 0
    out = capsys.readouterr()
    assert out.out.strip() == str(loras / "R4R8")
    record = json.loads((loras / "R4R8" / "lora-deck-blend.json").read_text())
    assert record["exact"] and record["sources"] == STACK and record["combination"] == "cat"
    torch.testing.assert_close(_adapter_logits(base, loras / "R4R8"), stack, atol=1e-5, rtol=0)


def test_blend_kinds_fold_the_scale(rs_loras):
    """svd at full rank (12 = 4 + 8) is exact too, so it shows the rsLoRA scale folded right; ties is an
    approximation by design: written, with its measured deviation in the record."""
    base, loras = rs_loras
    engine = Engine(base.parent, loras)
    engine.load(ModelSpec(model=base.name))
    engine.set_adapters({"R8": 1.0})
    svd = engine.blend_adapters(STACK, "svd12", combination_type="svd", svd_rank=12)
    torch.testing.assert_close(_adapter_logits(base, svd), _stack_logits(base, loras, STACK), atol=1e-4, rtol=0)
    write_adapter(base, loras / "R4b", target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], r=4, alpha=0.5,
                  seed=7, use_rslora=True)
    ties = engine.blend_adapters({"R4": 1.0, "R4b": 0.5}, "tied", combination_type="ties", density=0.5)
    record = json.loads((ties / "lora-deck-blend.json").read_text())
    assert not record["exact"] and record["max_relative_deviation"] > 0.01 and "approximation" in record["note"]
    assert engine.active_adapters == {"R8": 1.0}
    engine.unload()


@pytest.mark.parametrize("variant, reason", [({"use_dora": True}, "DoRA"), ({"lora_bias": True}, "lora_bias")])
def test_dora_and_lora_bias_blends_are_refused(variant, reason, rs_loras, tmp_path):
    base, _ = rs_loras
    loras = tmp_path / "loras"
    write_adapter(base, loras / "plain", target_modules=["q_proj", "v_proj"], r=4, alpha=8, seed=1)
    write_adapter(base, loras / "odd", target_modules=["q_proj", "v_proj"], r=4, alpha=8, seed=2, **variant)
    engine = Engine(base.parent, loras)
    engine.load(ModelSpec(model=base.name))
    engine.set_adapters({"plain": 1.0})
    with pytest.raises(BadInput, match=f"blend refused: odd .*{reason}"):
        engine.blend_adapters({"plain": 1.0, "odd": 0.5}, "mixed")
    assert not (loras / "mixed").exists() and engine.active_adapters == {"plain": 1.0}
    engine.unload()


def test_safetensors_export_of_rslora_stack_equals_peft_merge(rs_loras, tmp_path):
    """In float32, the base's own dtype, which the export keeps."""
    base, loras = rs_loras
    tok, peft = _peft(base, {n: loras / n for n in STACK}, torch.float32)
    peft.base_model.set_adapter(list(STACK))
    for module in peft.modules():
        if isinstance(module, LoraLayer):
            for n, w in STACK.items():
                module.set_scale(n, w)
    merged = _logits(tok, peft.merge_and_unload())
    out = export_model(base.name, list(STACK), list(STACK.values()), "safetensors", tmp_path / "merged",
                       base.parent, loras)
    ours = _logits(tok, AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32))
    torch.testing.assert_close(ours, merged, atol=1e-5, rtol=0)


def test_file_blend_for_remote_engines_equals_the_stack(rs_loras, tmp_path):
    """The blend a remote engine of one adapter per request gets (webui/adapters/file_blend.py: from the files,
    no base): plain PEFT loads it and gives the stack's logits; DoRA sources are refused."""
    from webui.adapters.file_blend import cat_blend

    base, loras = rs_loras
    out = cat_blend([(loras / n, w) for n, w in STACK.items()], tmp_path / "blend")
    assert float((_adapter_logits(base, out) - _stack_logits(base, loras, STACK)).abs().max()) < 1e-5
    write_adapter(base, tmp_path / "D", target_modules=["q_proj"], r=2, alpha=4, use_dora=True)
    with pytest.raises(BadInput, match="DoRA"):
        cat_blend([(loras / "R4", 1.0), (tmp_path / "D", 1.0)], tmp_path / "nope")
    assert not (tmp_path / "nope").exists()
