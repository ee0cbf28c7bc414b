"""Bad adapters get a clear error naming the problem, and the loaded base and the adapters already
applied are unchanged afterwards (same output as before). Also: unsupported targets are ignored with a
warning, safetensors wins over .bin, a plain .bin loads with weights_only, and `inspect` on the CLI."""
import json
import os
import pickle
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.helpers import GREEDY, PROMPT, ROOT, peft_reference
from webui.engine import Engine
from webui.errors import BadInput, Incompatible
from webui.options.config import ModelSpec
from webui.testing.tiny_models import build_model, build_tokenizer, write_adapter


@pytest.fixture(scope="module")
def adapters(tiny_models, tmp_path_factory):
    """A good adapter for tiny-llama and one made for a wider llama (another base)."""
    root = tmp_path_factory.mktemp("adapter-sources")
    base = tiny_models["llama"]
    write_adapter(base, root / "good", target_modules=["q_proj", "v_proj"], seed=5)
    wide = root / "wide-llama"
    tok = build_tokenizer()
    model = build_model("llama", tok)
    model.config.hidden_size, model.config.intermediate_size = 48, 96
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_config(model.config).save_pretrained(str(wide))
    tok.save_pretrained(str(wide))
    write_adapter(wide, root / "other-base", target_modules=["q_proj", "v_proj"])
    return root


@pytest.fixture
def setup(adapters, tiny_models, tmp_path):
    loras = tmp_path / "loras"
    shutil.copytree(adapters / "good", loras / "good")
    engine = Engine(tiny_models["llama"].parent, loras)
    engine.load(ModelSpec(model="tiny-llama"))
    engine.set_adapters({"good": 1.0})
    return engine, loras, engine.generate(PROMPT, GREEDY)


def _copy(loras, name="bad", src="good"):
    shutil.copytree(loras / src, loras / name)
    return loras / name


def _truncate(loras, adapters):
    w = _copy(loras) / "adapter_model.safetensors"
    w.write_bytes(w.read_bytes()[:100])


def _bad_json(loras, adapters):
    (_copy(loras) / "adapter_config.json").write_text("{ r: 8,")


def _no_weights(loras, adapters):
    (_copy(loras) / "adapter_model.safetensors").unlink()


def _other_base(loras, adapters):
    shutil.copytree(adapters / "other-base", loras / "bad")


def _nonsense(key, value):
    def damage(loras, adapters):
        d = _copy(loras)
        cfg = json.loads((d / "adapter_config.json").read_text())
        cfg[key] = value
        (d / "adapter_config.json").write_text(json.dumps(cfg))
    return damage


def _rank_mismatch(loras, adapters):
    _nonsense("r", 16)(loras, adapters)


def _nan(value):
    def damage(loras, adapters):
        w = _copy(loras) / "adapter_model.safetensors"
        state = load_file(str(w))
        key = sorted(state)[0]
        state[key][0, 0] = value
        save_file(state, str(w))
    return damage


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/lora-deck-pwned",))


def _evil_bin(loras, adapters):
    d = _copy(loras)
    state = load_file(str(d / "adapter_model.safetensors"))
    (d / "adapter_model.safetensors").unlink()
    with open(d / "adapter_model.bin", "wb") as f:
        pickle.dump({**state, "payload": _Evil()}, f)


BAD = {
    "truncated safetensors": (_truncate, "corrupt or truncated"),
    "config not JSON": (_bad_json, "not valid JSON"),
    "missing weights": (_no_weights, "no weights file"),
    "another base": (_other_base, "adapter expects a 48→32 layer, the base has 32→32"),
    "rank zero": (_nonsense("r", 0), "rank r=0"),
    "rank text": (_nonsense("r", "eight"), "rank r='eight'"),
    "alpha negative": (_nonsense("lora_alpha", -4), "lora_alpha=-4"),
    "rank disagrees with weights": (_rank_mismatch, "weights have rank 4/4 but the config says r=16"),
    "NaN weights": (_nan(float("nan")), "non-finite weights"),
    "Inf weights": (_nan(float("inf")), "non-finite weights"),
    "pickle that runs code": (_evil_bin, "refused: it holds pickled objects"),
    "not LoRA": (_nonsense("peft_type", "IA3"), "only LoRA adapters"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_adapter_is_refused_and_nothing_changes(case, setup, adapters):
    engine, loras, before = setup
    damage, message = BAD[case]
    damage(loras, adapters)
    if os.path.exists("/tmp/lora-deck-pwned"):
        os.unlink("/tmp/lora-deck-pwned")
    with pytest.raises(BadInput, match=message) as err:
        engine.set_adapters({"good": 1.0, "bad": 0.5})
    assert "bad" in str(err.value)
    assert not os.path.exists("/tmp/lora-deck-pwned")
    assert engine.active_adapters == {"good": 1.0}
    assert "bad" not in engine._backend.adapters_loaded
    assert engine.generate(PROMPT, GREEDY) == before


def test_incompatible_report_explains(setup, adapters):
    engine, loras, _ = setup
    _other_base(loras, adapters)
    with pytest.raises(Incompatible) as err:
        engine.set_adapters({"bad": 1.0})
    report = err.value.report
    assert report.verdict == "incompatible"
    assert any("wide-llama" in w for w in report.warnings)  # it names the base it was trained on
    assert len(report.reasons) == 4  # q_proj and v_proj of both layers


@pytest.mark.parametrize("name", ["../good", "/etc", "good/../../x", "..", "a/b", ""])
def test_names_cannot_escape_the_adapters_folder(name, setup):
    engine, loras, before = setup
    with pytest.raises(BadInput, match="not allowed|escapes"):
        engine.set_adapters({name: 1.0})
    assert engine.generate(PROMPT, GREEDY) == before


def test_symlink_out_of_the_adapters_folder_is_refused(setup, adapters):
    engine, loras, _ = setup
    (loras / "sneaky").symlink_to(adapters / "good", target_is_directory=True)
    with pytest.raises(BadInput, match="escapes"):
        engine.set_adapters({"sneaky": 1.0})


def test_bad_weight_values(setup):
    engine, _, before = setup
    for w in (float("nan"), float("inf"), "1"):
        with pytest.raises(BadInput, match="finite number"):
            engine.set_adapters({"good": w})
    assert engine.generate(PROMPT, GREEDY) == before


def test_unsupported_targets_are_ignored_with_a_warning(setup, tiny_models):
    engine, loras, _ = setup
    d = _copy(loras, "extra")
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["target_modules"] = cfg["target_modules"] + ["w1"]
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    state = load_file(str(d / "adapter_model.safetensors"))
    state["base_model.model.model.layers.0.mlp.w1.lora_A.weight"] = torch.randn(4, 32)
    state["base_model.model.model.layers.0.mlp.w1.lora_B.weight"] = torch.randn(64, 4)
    save_file(state, str(d / "adapter_model.safetensors"))

    report = engine.adapter_report("extra")
    assert report.verdict == "warnings" and report.ignored_targets == ["w1"]
    assert "w1" in report.warnings[0] and "ignored" in report.warnings[0]
    expected, _ = peft_reference(tiny_models["llama"], {"good": (loras / "good", 1.0)})
    engine.set_adapters({"extra": 1.0})
    assert engine.generate(PROMPT, GREEDY) == expected


def test_safetensors_preferred_and_bin_loads_safely(setup, tiny_models):
    engine, loras, before = setup
    d = _copy(loras, "both")
    state = load_file(str(d / "adapter_model.safetensors"))
    torch.save({k: torch.zeros_like(v) for k, v in state.items()}, d / "adapter_model.bin")
    assert engine.adapter_report("both").weights_format == "safetensors"
    engine.set_adapters({"both": 1.0})
    assert engine.generate(PROMPT, GREEDY) == before  # the real weights, not the zeros in the .bin

    d = _copy(loras, "binonly")
    (d / "adapter_model.safetensors").unlink()
    torch.save(state, d / "adapter_model.bin")
    assert engine.adapter_report("binonly").weights_format == "bin"
    engine.set_adapters({"binonly": 1.0})
    assert engine.generate(PROMPT, GREEDY) == before


def test_changed_files_are_reloaded(setup, adapters, tiny_models):
    engine, loras, before = setup
    engine.clear_adapters()
    shutil.rmtree(loras / "good")
    write_adapter(tiny_models["llama"], loras / "good", target_modules=["q_proj", "v_proj"], seed=77)
    expected, _ = peft_reference(tiny_models["llama"], {"good": (loras / "good", 1.0)})
    engine.set_adapters({"good": 1.0})
    assert engine.generate(PROMPT, GREEDY) == expected != before


def test_inspect_cli(setup, adapters, tiny_models):
    engine, loras, _ = setup
    _other_base(loras, adapters)
    common = ["--models-dir", str(tiny_models["llama"].parent), "--loras-dir", str(loras)]
    ok = subprocess.run([sys.executable, "-m", "webui", "inspect", "good", "--model", "tiny-llama", "--json", *common],
                        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    data = json.loads(ok.stdout)
    assert (data["verdict"], data["rank"], data["layers_checked"]) == ("ok", 4, 4)
    assert sorted(data["targets"]) == ["q_proj", "v_proj"]
    bad = subprocess.run([sys.executable, "-m", "webui", "inspect", "bad", "--model", "tiny-llama", *common],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 3
    assert "INCOMPATIBLE" in bad.stdout and "48→32" in bad.stdout
