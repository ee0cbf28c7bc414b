"""The GPTQ loader and GPTQ export on CPU, with a tiny Llama (hidden 128: GPTQModel's CPU int4 kernel needs
the input size to be a multiple of the group size, 32 here) quantized to 4 bits once per session with the
project's own calibration text. References come from plain transformers/PEFT: the GPTQ folder loaded by
`AutoModelForCausalLM.from_pretrained` with PeftModel on top (must match us exactly) and the float model
with the same adapter (must be close: 4-bit rounding is the only difference; tolerances measured here)."""
import json
import shutil
import subprocess
import sys

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.conftest import ROOT
from tests.tiny_models import build_tokenizer, write_adapter
from webui.backends.base import UnsupportedOperation
from webui.config import GenerationParams, ModelSpec
from webui.engine import Engine

PROMPT = "The quick brown fox"
GREEDY = GenerationParams(temperature=0, max_new_tokens=12)
GROUP = 32
# Measured here (relative L2 distance of all logits, 4-bit, group 32): GPTQ + adapter vs float + the same
# adapter 0.11 (A) and 0.17 (B); the exported merge-then-quantize model vs the float merged one 0.15; the
# adapters themselves move the logits by 1.1-1.2. Each quantized layer's weights are off by ~12% (GPTQ on
# random Gaussian weights); real checkpoints quantize better. Bounds leave room for other CPUs and kernels.
REL_TOL = 0.25


def _tiny_llama(out, hidden: int, seed: int = 0):
    import transformers

    tok = build_tokenizer()
    config = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        # Layers with the spread of real checkpoints: larger random weights make a chaotic network in which any
        # rounding error grows layer by layer (0.1: 3x the error here). A wider lm_head (not quantized) gives
        # decisive logits, as in tests/tiny_models.py, so that training has something to learn quickly.
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.3 if name.startswith("lm_head") else 0.02)
    model.generation_config.update(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                   pad_token_id=tok.pad_token_id)
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    return out


@pytest.fixture(scope="session")
def gptq_dirs(tmp_path_factory):
    """models/{tiny-float, tiny-gptq, other-float} and loras/{A, B, other} shared by the whole session."""
    from webui.export_gptq import quantize_folder

    root = tmp_path_factory.mktemp("gptq")
    models, loras = root / "models", root / "loras"
    base = _tiny_llama(models / "tiny-float", 128)
    quantize_folder(base, models / "tiny-gptq", bits=4, group_size=GROUP)
    other = _tiny_llama(models / "other-float", 64, seed=3)
    # write_adapter's LoRA weights have a 0.5 spread; a small alpha makes each weight change about as large as
    # the base's own weights (a strong but realistic adapter; a far larger one would be most of the model)
    write_adapter(base, loras / "A", target_modules=["q_proj", "v_proj"], r=4, alpha=0.25, seed=1)
    write_adapter(base, loras / "B", target_modules="all-linear", r=8, alpha=0.25, seed=2)
    write_adapter(other, loras / "other", target_modules=["q_proj", "v_proj"], r=4, alpha=0.25, seed=4)
    return models, loras


@pytest.fixture(scope="module")
def engine(gptq_dirs):
    models, loras = gptq_dirs
    engine = Engine(models, loras)
    engine.load(ModelSpec(model="tiny-gptq"))  # auto: the config's GPTQ quantization_config picks gptq
    yield engine
    engine.unload()


def logits(engine: Engine, prompt=PROMPT):
    backend = engine._backend
    with torch.no_grad():
        return backend.model(**backend.tokenizer(prompt, return_tensors="pt")).logits[0]


def peft_logits(folder, adapters: dict, prompt=PROMPT):
    """Plain transformers + PEFT: `adapters` name -> (path, weight); several are combined with 'cat'."""
    tok = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, device_map={"": "cpu"})
    names = list(adapters)
    peft = PeftModel.from_pretrained(model, str(adapters[names[0]][0]), adapter_name=names[0])
    for n in names[1:]:
        peft.load_adapter(str(adapters[n][0]), adapter_name=n)
    if len(names) > 1 or adapters[names[0]][1] != 1.0:
        peft.add_weighted_adapter(names, [w for _, w in adapters.values()], "mix", combination_type="cat")
        peft.set_adapter("mix")
    with torch.no_grad():
        return peft(**tok(prompt, return_tensors="pt")).logits[0]


def rel_err(a, b) -> float:
    """Relative L2 distance of logits a from the reference b (all positions)."""
    return float((a - b).norm() / b.norm())


def test_loads_on_gptq_loader_and_generates(engine, gptq_dirs):
    models, _ = gptq_dirs
    assert engine.loaded.loader == "gptq" and "GPTQ 4-bit, group 32" in engine.loaded.dtype
    caps = engine.capabilities
    assert caps.adapters and caps.adapter_stack and caps.mixed_batch and not caps.merge
    # the same greedy text as plain transformers on the same folder
    tok = AutoTokenizer.from_pretrained(str(models / "tiny-gptq"))
    ref = AutoModelForCausalLM.from_pretrained(str(models / "tiny-gptq"), dtype=torch.float32, device_map={"": "cpu"})
    ids = tok(PROMPT, return_tensors="pt")
    out = ref.generate(**ids, do_sample=False, max_new_tokens=12, pad_token_id=tok.pad_token_id)
    expected = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert engine.generate(PROMPT, GREEDY) == expected
    assert "".join(engine.stream(PROMPT, GREEDY)) == expected


def test_float_folder_is_refused_by_gptq_loader(gptq_dirs):
    models, loras = gptq_dirs
    with pytest.raises(Exception, match="not GPTQ-quantized"):
        Engine(models, loras).load(ModelSpec(model="tiny-float", loader="gptq"))


def test_adapter_equals_peft_and_is_close_to_float_model(engine, gptq_dirs):
    models, loras = gptq_dirs
    base = logits(engine)
    for name in ("A", "B"):
        engine.set_adapters({name: 1.0})
        ours = logits(engine)
        # exactly PEFT on the same GPTQ weights
        torch.testing.assert_close(ours, peft_logits(models / "tiny-gptq", {name: (loras / name, 1.0)}),
                                   atol=1e-5, rtol=1e-5)
        # close to the float model with the same adapter; the adapter's own effect is far larger
        float_ref = peft_logits(models / "tiny-float", {name: (loras / name, 1.0)})
        err, effect = rel_err(ours, float_ref), rel_err(base, float_ref)
        print(f"adapter {name}: GPTQ vs float relative L2 error {err:.3f}, adapter effect {effect:.3f}")
        assert err < REL_TOL and effect > 4 * err
    engine.set_adapters({"A": 1.0, "B": 0.5})  # a weighted stack, as PEFT's cat combination
    float_ref = peft_logits(models / "tiny-float", {"A": (loras / "A", 1.0), "B": (loras / "B", 0.5)})
    assert rel_err(logits(engine), float_ref) < REL_TOL
    engine.clear_adapters()
    assert torch.equal(logits(engine), base)


def test_hot_swap_repeats_exactly(engine):
    model = engine._backend.model
    outputs, texts = [], []
    for name in ("A", "B", "A"):
        engine.set_adapters({name: 1.0})
        outputs.append(logits(engine))
        texts.append(engine.generate(PROMPT, GREEDY))
    assert torch.equal(outputs[0], outputs[2]) and texts[0] == texts[2]
    assert not torch.equal(outputs[0], outputs[1])
    assert engine._backend.model is model  # never reloaded
    engine.clear_adapters()


def test_incompatible_adapter_refused_output_unchanged(engine):
    engine.set_adapters({"A": 1.0})
    before = logits(engine)
    report = engine.adapter_report("other")
    assert not report.compatible
    with pytest.raises(Exception, match="other"):
        engine.set_adapters({"other": 1.0})
    assert engine.active_adapters == {"A": 1.0}
    assert torch.equal(logits(engine), before)
    engine.clear_adapters()


def test_merge_refused_with_the_way_out(engine):
    engine.set_adapters({"A": 1.0})
    before = logits(engine)
    with pytest.raises(UnsupportedOperation, match="Merge, then quantize.*--format gptq"):
        engine.merge_adapters()
    assert not engine.merged and torch.equal(logits(engine), before)
    engine.clear_adapters()


def test_mixed_batch_each_row_its_adapter(engine):
    """One batched pass where each row has its own adapter gives each row's own single-request text."""
    prompts, names = [PROMPT, "Hello! How can I", "One, two, three"], ["A", None, "B"]
    single = []
    for prompt, name in zip(prompts, names):
        engine.set_adapters({name: 1.0} if name else {})
        single.append(engine.generate(prompt, GREEDY))
    engine.set_adapters({"B": 0.5})  # the UI's stack: the batch must not use it, and must restore it
    texts = [""] * 3
    for event in engine._backend.stream_batch(prompts, GREEDY, names):
        if event[0] == "delta":
            texts[event[1]] += event[2]
    assert texts == single and len(set(single)) == 3
    assert engine.active_adapters == {"B": 0.5}
    engine.clear_adapters()


def test_blend_on_gptq_equals_the_stack(engine):
    engine.set_adapters({"A": 1.0, "B": 0.5})
    stacked = logits(engine)
    engine.blend_adapters({"A": 1.0, "B": 0.5}, "AB", combination_type="cat")
    engine.set_adapters({"AB": 1.0})
    # The same sum in another order; GPTQModel's CPU int4 kernel takes bfloat16 activations, so float32
    # rounding differences reappear at bfloat16 resolution (2^-8) in the next layers (measured: 6e-4)
    err = rel_err(logits(engine), stacked)
    print(f"blend cat vs the stack: relative L2 error {err:.4f}")
    assert err < 0.01
    engine.clear_adapters()


def test_group_size_must_divide_the_layers(tmp_path):
    """GPTQModel's CPU int4 kernel fails at the first forward pass when a layer's input size is not a multiple
    of the group size (SmolLM2: 576 with 128), so export picks one that fits or refuses before any work."""
    from webui.export_gptq import pick_group_size

    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 576, "intermediate_size": 1536}))
    assert pick_group_size(tmp_path) == 64 and pick_group_size(tmp_path, 32) == 32
    with pytest.raises(UnsupportedOperation, match="does not divide"):
        pick_group_size(tmp_path, 128)


def test_export_gptq_merges_then_quantizes(gptq_dirs, tmp_path):
    models, loras = gptq_dirs
    out = tmp_path / "merged-gptq"
    calibration = tmp_path / "mine.txt"  # a user's own calibration text
    calibration.write_text(ROOT.joinpath("webui", "data", "calibration.txt").read_text()[:6000])
    r = subprocess.run([sys.executable, "-m", "webui", "export", "--model", "tiny-float", "--models-dir", str(models),
                        "--loras-dir", str(loras), "--lora", "B", "--format", "gptq", "--group-size", str(GROUP),
                        "--calibration", str(calibration), "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert not (out / "adapter_config.json").exists()
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "gptq"
    shutil.copytree(out, models / "merged-gptq")
    engine = Engine(models, loras)
    engine.load(ModelSpec(model="merged-gptq"))
    assert engine.loaded.loader == "gptq" and engine.active_adapters == {}
    exported = logits(engine)
    engine.unload()
    merged = peft_logits(models / "tiny-float", {"B": (loras / "B", 1.0)})  # float base + B (= merged)
    tok = AutoTokenizer.from_pretrained(str(models / "tiny-float"))
    plain = AutoModelForCausalLM.from_pretrained(str(models / "tiny-float"), dtype=torch.float32)
    with torch.no_grad():
        without = plain(**tok(PROMPT, return_tensors="pt")).logits[0]
    err, effect = rel_err(exported, merged), rel_err(without, merged)
    agree = float((exported.argmax(-1) == merged.argmax(-1)).float().mean())
    print(f"export gptq: vs float merged relative L2 error {err:.3f}, top-1 agreement {agree:.2f}; "
          f"adapter effect {effect:.3f}")
    assert err < REL_TOL and effect > 4 * err  # the adapter's effect survived quantization


def test_qlora_training_on_gptq_base_lowers_loss(gptq_dirs, tmp_path):
    from webui.config import TrainConfig
    from webui.training.trainer import train

    models, _ = gptq_dirs
    data = tmp_path / "story.txt"
    data.write_text("The lighthouse keeper counts the ships. One, two, three ships pass by. " * 40)
    training = {"max_steps": 12, "learning_rate": 0.1, "batch_size": 4, "save_steps": 12, "eval_steps": 12,
                "cutoff_len": 64, "logging_steps": 1}
    cfg = TrainConfig.from_dict({"base_model": "tiny-gptq", "output": "qlora", "training": training,
                                 "dataset": {"path": str(data), "format": "raw"},
                                 "lora": {"r": 8, "lora_alpha": 16, "target_modules": "all-linear"}})
    out = train(cfg, models, tmp_path / "loras", tmp_path / "runs", log=lambda m: None)
    rows = [json.loads(line) for line in (tmp_path / "runs" / "qlora" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses[-1] < 0.7 * losses[0], losses
    targets = json.loads((out / "adapter_config.json").read_text())["target_modules"]
    assert {"q_proj", "down_proj"} <= set(targets)  # all-linear reached the quantized layers


def test_embedded_gptq_folder_is_reused(gptq_dirs, tmp_path):
    """With no --model and --loader gptq the embedded model is quantized once into models/<name>-GPTQ/; a
    finished folder (its marker written) is reused without quantizing again."""
    from webui import models as model_lookup
    from webui.export_gptq import _DONE, embedded_folder

    models, _ = gptq_dirs
    target = embedded_folder(tmp_path)
    shutil.copytree(models / "tiny-gptq", target)
    (target / _DONE).write_text("test\n")
    assert model_lookup.resolve("", "gptq", tmp_path) == (target, "gptq")
