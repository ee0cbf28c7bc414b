"""The GPTQ loader and GPTQ export on CPU, with a tiny Llama (hidden 128: GPTQModel's CPU int4 kernel needs
the input size to be a multiple of the group size, 32 here) quantized to 4 bits once per session with the
project's own calibration text (the `gptq_dirs` fixture). What is particular to GPTQ is here: the loader's
capabilities and its base output (plain transformers on the same folder gives the same text), a float folder
refused, one batch with a different adapter per row, blending, the group size, merge-then-quantize export,
QLoRA training and the embedded GPTQ copy. The adapter behaviour every loader shares (PEFT equality, stacks,
hot-swap, refusal, merge) is in test_loader_contract.py."""
import json
import shutil
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.helpers import (
    GPTQ_GROUP,
    GPTQ_REL_TOL,
    GREEDY,
    PROMPT,
    ROOT,
    hf_logits,
    peft_reference,
    reference_greedy,
    rel_err,
)
from webui.engine import Engine
from webui.errors import BadInput
from webui.options.config import ModelSpec


@pytest.fixture(scope="module")
def engine(gptq_dirs):
    models, loras = gptq_dirs
    engine = Engine(models, loras)
    engine.load(ModelSpec(model="tiny-gptq"))  # auto: the config's GPTQ quantization_config picks gptq
    yield engine
    engine.unload()


def test_loads_on_gptq_loader_and_generates(engine, gptq_dirs):
    models, _ = gptq_dirs
    assert engine.loaded.loader == "gptq" and "GPTQ 4-bit, group 32" in engine.loaded.dtype
    caps = engine.capabilities
    assert caps.adapters and caps.adapter_stack and caps.mixed_batch and not caps.merge
    # the same greedy text as plain transformers on the same folder
    expected = reference_greedy(models / "tiny-gptq", PROMPT, GREEDY.max_new_tokens)
    assert engine.generate(PROMPT, GREEDY) == expected
    assert "".join(engine.stream(PROMPT, GREEDY)) == expected


def test_float_folder_is_refused_by_gptq_loader(gptq_dirs):
    models, loras = gptq_dirs
    with pytest.raises(Exception, match="not GPTQ-quantized"):
        Engine(models, loras).load(ModelSpec(model="tiny-float", loader="gptq"))


def test_mixed_batch_each_row_its_adapter(engine):
    """One batched pass where each row has its own adapter gives each row's own single-request text."""
    prompts, names = [PROMPT, "Hello! How can I", "One, two, three"], ["A", None, "B"]
    single = []
    for prompt, name in zip(prompts, names):
        engine.set_adapters({name: 1.0} if name else {})
        single.append(engine.generate(prompt, GREEDY))
    engine.set_adapters({"B": 0.5})  # the UI's stack: the batch must not use it, and must restore it
    # queued together through the one door: the rows share the running batch, each with its own adapter
    handles = [engine.submit(p, GREEDY, {n: 1.0} if n else {}) for p, n in zip(prompts, names)]
    texts = [h.text() for h in handles]
    assert texts == single and len(set(single)) == 3
    assert engine.active_adapters == {"B": 0.5}
    engine.clear_adapters()


def test_blend_on_gptq_equals_the_stack(engine):
    engine.set_adapters({"A": 1.0, "B": 0.5})
    stacked = hf_logits(engine)
    engine.blend_adapters({"A": 1.0, "B": 0.5}, "AB", combination_type="cat")
    engine.set_adapters({"AB": 1.0})
    # The same sum in another order; GPTQModel's CPU int4 kernel takes bfloat16 activations, so float32
    # rounding differences reappear at bfloat16 resolution (2^-8) in the next layers (measured: 6e-4)
    err = rel_err(hf_logits(engine), stacked)
    print(f"blend cat vs the stack: relative L2 error {err:.4f}")
    assert err < 0.01
    engine.clear_adapters()


def test_group_size_must_divide_the_layers(tmp_path):
    """GPTQModel's CPU int4 kernel fails at the first forward pass when a layer's input size is not a multiple
    of the group size (SmolLM2: 576 with 128), so export picks one that fits or refuses before any work."""
    from webui.backends.hf.gptq_quantize import pick_group_size

    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 576, "intermediate_size": 1536}))
    assert pick_group_size(tmp_path) == 64 and pick_group_size(tmp_path, 32) == 32
    with pytest.raises(BadInput, match="does not divide"):
        pick_group_size(tmp_path, 128)


def test_export_gptq_merges_then_quantizes(gptq_dirs, tmp_path):
    models, loras = gptq_dirs
    out = tmp_path / "merged-gptq"
    calibration = tmp_path / "mine.txt"  # a user's own calibration text
    calibration.write_text(ROOT.joinpath("webui", "data", "calibration.txt").read_text()[:6000])
    r = subprocess.run([sys.executable, "-m", "webui", "export", "--model", "tiny-float", "--models-dir", str(models),
                        "--loras-dir", str(loras), "--lora", "B", "--format", "gptq", "--group-size", str(GPTQ_GROUP),
                        "--calibration", str(calibration), "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert not (out / "adapter_config.json").exists()
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "gptq"
    shutil.copytree(out, models / "merged-gptq")
    engine = Engine(models, loras)
    engine.load(ModelSpec(model="merged-gptq"))
    assert engine.loaded.loader == "gptq" and engine.active_adapters == {}
    exported = hf_logits(engine)
    engine.unload()
    merged = peft_reference(models / "tiny-float", {"B": (loras / "B", 1.0)})[1]  # float base + B (= merged)
    tok = AutoTokenizer.from_pretrained(str(models / "tiny-float"))
    plain = AutoModelForCausalLM.from_pretrained(str(models / "tiny-float"), dtype=torch.float32)
    with torch.no_grad():
        without = plain(**tok(PROMPT, return_tensors="pt")).logits[0]
    err, effect = rel_err(exported, merged), rel_err(without, merged)
    agree = float((exported.argmax(-1) == merged.argmax(-1)).float().mean())
    print(f"export gptq: vs float merged relative L2 error {err:.3f}, top-1 agreement {agree:.2f}; "
          f"adapter effect {effect:.3f}")
    assert err < GPTQ_REL_TOL and effect > 4 * err  # the adapter's effect survived quantization


def test_qlora_training_on_gptq_base_lowers_loss(gptq_dirs, tmp_path):
    from webui.options.training import TrainConfig
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
    from webui.backends import models as model_lookup
    from webui.backends.embedded import GPTQ_DONE, gptq_folder

    models, _ = gptq_dirs
    target = gptq_folder(tmp_path)
    shutil.copytree(models / "tiny-gptq", target)
    (target / GPTQ_DONE).write_text("test\n")
    assert model_lookup.resolve("", "gptq", tmp_path) == (target, "gptq")
