"""In-app LoRA training on a tiny Llama: every dataset format lowers the loss, the adapter loads with plain
PEFT and changes the output, stop + resume and kill -9 + resume continue from the checkpoint, every
seed-002 key reaches the PEFT model, and bad configs or datasets fail fast with nothing half-written."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.helpers import ROOT, write_data
from webui.errors import BadInput
from webui.options.training import LoraTrainConfig, TrainConfig
from webui.training.runner import TrainingRunner
from webui.training.trainer import latest_checkpoint, train

SEED_002 = next((ROOT.parent / "shared" / "seeds").glob("002_*.txt"), None)


def config(output: str, path: Path, fmt: str, **training) -> TrainConfig:
    t = {"max_steps": 12, "learning_rate": 0.01, "batch_size": 4, "save_steps": 6, "eval_steps": 6,
         "cutoff_len": 64, **training}
    return TrainConfig.from_dict({"base_model": "tiny-llama", "output": output,
                                  "dataset": {"path": str(path), "format": "chat" if fmt == "sharegpt" else fmt},
                                  "lora": {"r": 8, "lora_alpha": 16, "target_modules": "all-linear"},
                                  "training": t})


@pytest.fixture
def dirs(tmp_path, tiny_models):
    return {"models": tiny_models["llama"].parent, "loras": tmp_path / "loras", "runs": tmp_path / "runs",
            "data": write_data(tmp_path / "data")}


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("fmt", ["raw", "instruction", "chat", "sharegpt"])
def test_each_format_lowers_the_loss(fmt, dirs):
    out = train(config(f"fmt-{fmt}", dirs["data"][fmt], fmt), dirs["models"], dirs["loras"], dirs["runs"],
                log=lambda m: None)
    losses = [m["loss"] for m in metrics(dirs["runs"] / f"fmt-{fmt}") if "loss" in m]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < losses[0] * 0.8, losses
    assert (out / "adapter_model.safetensors").is_file() and (out / "training_config.yaml").is_file()
    assert any("eval_loss" in m for m in metrics(dirs["runs"] / f"fmt-{fmt}"))


def test_adapter_loads_with_plain_peft_and_changes_output(dirs, tiny_models):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = train(config("peft-check", dirs["data"]["instruction"], "instruction"), dirs["models"], dirs["loras"],
                dirs["runs"], log=lambda m: None)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "tiny-llama"
    base_path = tiny_models["llama"]
    tok = AutoTokenizer.from_pretrained(str(base_path))
    prompt = tok.apply_chat_template([{"role": "user", "content": "Count to 5."}], tokenize=False,
                                     add_generation_prompt=True)
    ids = tok(prompt, return_tensors="pt")
    base = AutoModelForCausalLM.from_pretrained(str(base_path))
    plain = tok.decode(base.generate(**ids, do_sample=False, max_new_tokens=10)[0, ids["input_ids"].shape[1]:])
    tuned = PeftModel.from_pretrained(base, str(out))
    adapted = tok.decode(tuned.generate(**ids, do_sample=False, max_new_tokens=10)[0, ids["input_ids"].shape[1]:])
    assert adapted != plain
    assert any(ch.isdigit() for ch in adapted)  # it learned to count


def test_chat_loss_is_on_assistant_tokens_only(tiny_models):
    from transformers import AutoTokenizer

    from webui.training.data import IGNORE, encode_chat

    tok = AutoTokenizer.from_pretrained(str(tiny_models["llama"]))
    msgs = [{"role": "user", "content": "Color?"}, {"role": "assistant", "content": "red"}]
    s = encode_chat(tok, msgs, 256)
    trained = tok.decode([t for t, lab in zip(s.input_ids, s.labels) if lab != IGNORE])
    assert trained == "red<|im_end|>\n" or trained.startswith("red")
    assert "Color" not in trained


def _wait(predicate, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    raise AssertionError("timed out")


def test_stop_then_resume_continues_from_the_checkpoint(dirs):
    runner = TrainingRunner(dirs["runs"], dirs["models"], dirs["loras"])
    cfg = config("stoppable", dirs["data"]["raw"], "raw", max_steps=400, save_steps=5, learning_rate=0.001)
    runner.start(cfg)
    _wait(lambda: runner.view("stoppable").step >= 7)
    runner.stop("stoppable")
    view = runner.view("stoppable")
    assert view.state == "stopped", view
    stopped_at = view.step
    assert latest_checkpoint(dirs["runs"] / "stoppable").name == f"checkpoint-{stopped_at}"
    assert not (dirs["loras"] / "stoppable").exists()

    cfg.training.max_steps = stopped_at + 5  # (same LoRA settings: a resume)
    runner.start(cfg)
    _wait(lambda: runner.view("stoppable").state in ("done", "failed"))
    assert runner.view("stoppable").state == "done", runner.view("stoppable").log_tail
    status = json.loads((dirs["runs"] / "stoppable" / "status.json").read_text())
    assert status["resumed_from"] == f"checkpoint-{stopped_at}" and status["num_processes"] == 1
    steps = [m["step"] for m in metrics(dirs["runs"] / "stoppable") if "loss" in m]
    assert steps[-5:] == list(range(stopped_at + 1, stopped_at + 6))  # continued, not restarted
    assert (dirs["loras"] / "stoppable" / "adapter_model.safetensors").is_file()


def test_kill_9_then_resume(dirs):
    runner = TrainingRunner(dirs["runs"], dirs["models"], dirs["loras"])
    cfg = config("killed", dirs["data"]["raw"], "raw", max_steps=400, save_steps=4, learning_rate=0.001)
    runner.start(cfg)
    run = dirs["runs"] / "killed"
    _wait(lambda: latest_checkpoint(run) is not None and runner.view("killed").step >= 6)
    os.kill(json.loads((run / "status.json").read_text())["pid"], signal.SIGKILL)
    _wait(lambda: runner.view("killed").state == "failed")
    ckpt = latest_checkpoint(run)
    cfg.training.max_steps = int(ckpt.name.split("-")[1]) + 3
    runner.start(cfg)
    _wait(lambda: runner.view("killed").state in ("done", "failed"))
    assert runner.view("killed").state == "done", runner.view("killed").log_tail
    assert json.loads((run / "status.json").read_text())["resumed_from"] == ckpt.name
    assert (dirs["loras"] / "killed" / "adapter_model.safetensors").is_file()


def _peft(arch_path, **lora):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(arch_path))
    return get_peft_model(model, LoraTrainConfig(**lora).peft_config())


def _lora_layers(model):
    from peft.tuners.lora import LoraLayer
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def test_every_seed_002_key_reaches_the_peft_model(tiny_models):
    from peft import PeftModelForCausalLM
    from peft.utils import ModulesToSaveWrapper

    llama, gpt2 = tiny_models["llama"], tiny_models["gpt2"]
    m = _peft(llama, task_type="CAUSAL_LM", target_modules=["q_proj"], r=4, lora_alpha=8, lora_dropout=0.3)
    assert isinstance(m, PeftModelForCausalLM)
    layers = _lora_layers(m)
    assert {n.rsplit(".", 1)[-1] for n in layers} == {"q_proj"}
    layer = next(iter(layers.values()))
    assert layer.lora_A["default"].weight.shape[0] == 4
    assert layer.scaling["default"] == 8 / 4
    assert layer.lora_dropout["default"].p == 0.3
    assert _peft(llama, target_modules=["q_proj"], r=4, lora_alpha=8, use_rslora=True) \
        .base_model.model.model.layers[0].self_attn.q_proj.scaling["default"] == pytest.approx(8 / 2)
    dora = _lora_layers(_peft(llama, target_modules=["v_proj"], use_dora=True))
    assert all("default" in m.lora_magnitude_vector for m in dora.values())
    assert isinstance(_peft(llama, target_modules=["q_proj"], modules_to_save=["lm_head"])
                      .base_model.model.lm_head, ModulesToSaveWrapper)
    for value, expected in ((1, {1}), ([0], {0})):
        names = _lora_layers(_peft(llama, target_modules=["q_proj", "v_proj"], layers_to_transform=value))
        assert {int(n.split("layers.")[1].split(".")[0]) for n in names} == expected
    names = _lora_layers(_peft(llama, target_modules=["q_proj"], layers_to_transform=[1], layers_pattern="layers"))
    assert {int(n.split("layers.")[1].split(".")[0]) for n in names} == {1}
    g = _peft(gpt2, target_modules=["c_attn"], fan_in_fan_out=True, bias="all")
    assert all(m.fan_in_fan_out for m in _lora_layers(g).values())
    assert all(p.requires_grad for n, p in g.named_parameters() if n.endswith(".bias"))
    assert not any(p.requires_grad for n, p in _peft(gpt2, target_modules=["c_attn"], fan_in_fan_out=True)
                   .named_parameters() if n.endswith(".bias"))


@pytest.mark.skipif(SEED_002 is None, reason="seeds not beside the checkout")
def test_seed_002_example_trains_as_written(dirs):
    example = yaml.safe_load(SEED_002.read_text().split("```yaml")[1].split("```")[0])
    cfg = TrainConfig.from_dict({"base_model": "tiny-llama", "output": "seed-example",
                                 "dataset": {"path": str(dirs["data"]["raw"]), "format": "raw"},
                                 "lora": example["lora"], "training": {"max_steps": 3, "cutoff_len": 64}})
    assert cfg.lora.r == 32 and cfg.lora.lora_dropout == 0.1
    out = train(cfg, dirs["models"], dirs["loras"], dirs["runs"], log=lambda m: None)
    saved = json.loads((out / "adapter_config.json").read_text())
    assert set(saved["target_modules"]) == set(example["lora"]["target_modules"]) and saved["r"] == 32


@pytest.mark.parametrize("lora, message", [
    ({"bias": "some"}, "lora.bias: 'some' is not one of: none, all, lora_only"),
    ({"rank": 8}, "lora: unknown key(s) rank"),
    ({"r": 0}, "lora.r: 0 is outside the allowed range"),
    ({"task_type": "CLASSIFY"}, "lora.task_type"),
    ({"layers_pattern": "h.(\\d+"}, "layers_pattern: 'h.(\\\\d+' is not a regular expression"),
    ({"layers_to_transform": "two"}, "layers_to_transform"),
    ({"target_modules": []}, "target_modules"),
])
def test_bad_lora_config_names_the_key(lora, message):
    with pytest.raises(BadInput) as err:
        TrainConfig.from_dict({"output": "x", "dataset": {"path": "d.txt"}, "lora": lora})
    assert message in str(err.value)


@pytest.mark.parametrize("content, fmt, message", [
    ("", "raw", "is empty"),
    ("{not json", "chat", "line 1 is not valid JSON"),
    ('{"instruction": "hi"}', "instruction", "record 1: missing field 'output'"),
    ('{"messages": [{"role": "user"}]}', "chat", "needs 'role' and 'content'"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "chat", "no assistant turn"),
    ('{"text": "hello"}', "chat", "missing field 'conversations'"),
])
def test_bad_dataset_fails_fast_without_half_adapter(content, fmt, message, dirs, tmp_path):
    path = tmp_path / ("bad.txt" if fmt == "raw" else "bad.jsonl")
    path.write_text(content)
    with pytest.raises(BadInput, match=message):
        train(config("bad", path, fmt), dirs["models"], dirs["loras"], dirs["runs"], log=lambda m: None)
    assert not (dirs["loras"] / "bad").exists()
    assert not (dirs["runs"] / "bad" / "checkpoints").exists()


def test_cli_refuses_existing_output_and_bad_target(dirs, tmp_path):
    (dirs["loras"] / "taken").mkdir(parents=True)
    cfg = config("taken", dirs["data"]["raw"], "raw").to_dict()
    path = tmp_path / "taken.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run = lambda p: subprocess.run([sys.executable, "-m", "webui", "train", "--config", str(p), "--models-dir",  # noqa: E731
                                    str(dirs["models"]), "--loras-dir", str(dirs["loras"]), "--runs-dir",
                                    str(dirs["runs"])], cwd=ROOT, capture_output=True, text=True, timeout=300)
    r = run(path)
    assert r.returncode == 1 and "already exists" in r.stderr
    cfg["output"], cfg["lora"]["target_modules"] = "nowhere", ["no_such_layer"]
    path.write_text(yaml.safe_dump(cfg))
    r = run(path)
    assert r.returncode == 1 and "no_such_layer" in r.stderr
    assert not (dirs["loras"] / "nowhere").exists()
