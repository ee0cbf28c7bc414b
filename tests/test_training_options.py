"""The `training.packing`, `training.warmup_ratio`, `dataset.train_on_prompt` and `training.precision` options on
the tiny models: a packed batch's loss is the mean token loss of its samples run one by one in plain transformers
(no attention across samples) and a packed run learns; the warm-up ratio gives transformers' linear warm-up over
ceil(ratio x steps) steps; train_on_prompt trains every token of the conversation (the loss is plain transformers'
loss over the whole chat-template rendering); the precision is chosen from the hardware and refused where it
cannot run. CPU only here: bf16/fp16 on a GPU are covered by the choice logic alone."""
from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.helpers import write_data
from webui.errors import BadInput, Unsupported
from webui.options.training import DatasetConfig, TrainConfig, TrainingParams
from webui.training import chunked_loss, packing, precision
from webui.training.data import IGNORE, conversations, load_files
from webui.training.trainer import train, training_arguments

LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.0}
LEARNS = {"r": 8, "lora_alpha": 16, "target_modules": "all-linear"}  # test_training's runs: enough to learn in 12 steps


@pytest.fixture
def dirs(tmp_path, tiny_models):
    return {"models": tiny_models["llama"].parent, "loras": tmp_path / "loras", "runs": tmp_path / "runs",
            "data": write_data(tmp_path / "data"), "base": tiny_models["llama"]}


def run(dirs, name: str, fmt: str = "chat", dataset: dict | None = None, lora: dict | None = None,
        **training) -> list[dict]:
    """Train; the rows of metrics.jsonl that carry a loss."""
    cfg = TrainConfig.from_dict({
        "base_model": "tiny-llama", "output": name,
        "dataset": {"path": str(dirs["data"][fmt]), "format": fmt, "eval_fraction": 0, **(dataset or {})},
        "lora": {**LORA, **(lora or {})},
        "training": {"max_steps": 6, "learning_rate": 0.01, "batch_size": 4, "save_steps": 100, "cutoff_len": 64,
                     # float32, as the references these tests compute (auto is bf16 on a CPU with bf16 instructions)
                     "precision": "fp32",
                     **training}})
    train(cfg, dirs["models"], dirs["loras"], dirs["runs"], log=lambda m: None)
    rows = [json.loads(line) for line in (dirs["runs"] / name / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r]


def mean_token_loss(model, rows: list[tuple[list[int], list[int]]]) -> float:
    """Plain transformers: each sample alone (no padding, no packing), the mean loss over all trained tokens."""
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, labels in rows:
            n = sum(1 for x in labels[1:] if x != IGNORE)  # the causal LM loss predicts labels[1:]
            loss = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss.item()
            total, count = total + loss * n, count + n
    return total / count


# -- packing ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "mistral", "gemma", "phi3", "phi", "qwen2", "cohere", "gpt2"])
def test_packed_batch_loss_equals_samples_run_alone(arch, tiny_models):
    """Each architecture we pack for keeps the samples of a packed row apart: the row's loss is the loss of the
    samples run one by one (a sample seeing its neighbours would change it)."""
    model = AutoModelForCausalLM.from_pretrained(str(tiny_models[arch]), dtype=torch.float32).eval()
    packing.prepare_model(model)
    g = torch.Generator().manual_seed(0)
    samples = [torch.randint(5, 300, (n,), generator=g).tolist() for n in (9, 17, 5, 12)]
    batch = packing.collator(None, True)([{"input_ids": s, "labels": s} for s in samples])
    assert batch["input_ids"].shape == (1, sum(map(len, samples)))  # one row, no padding
    with torch.no_grad():
        packed = model(**batch).loss.item()
    reference = mean_token_loss(model, [(s, s) for s in samples])
    assert abs(packed - reference) < 1e-4, (packed, reference)


def test_packing_refused_without_position_ids(tiny_models):
    model = AutoModelForCausalLM.from_pretrained(str(tiny_models["bloom"]))
    with pytest.raises(Unsupported, match="training.packing: .*position ids"):
        packing.prepare_model(model)


def test_packed_training_step_loss_equals_reference_and_packed_run_learns(dirs, monkeypatch):
    """Step 1 of a packed run (learning rate 0, the adapter starts as a no-op) logs the mean token loss of all the
    samples, each run alone in plain transformers; a packed run with a learning rate learns. The trainer's loss is
    the one made a slice at a time (webui/training/chunked_loss.py)."""
    calls = []
    sliced = chunked_loss.causal_lm_loss
    monkeypatch.setattr(chunked_loss, "causal_lm_loss", lambda *a, **k: calls.append(1) or sliced(*a, **k))
    rows = run(dirs, "packed-lr0", batch_size=16, max_steps=1, learning_rate=0.0, packing=True)
    assert calls
    tok = AutoTokenizer.from_pretrained(str(dirs["base"]))
    samples = load_files([dirs["data"]["chat"]], "chat", tok, 64)
    assert len(samples) <= 16  # all of them in the one packed batch
    model = AutoModelForCausalLM.from_pretrained(str(dirs["base"]), dtype=torch.float32)
    reference = mean_token_loss(model, [(s.input_ids, s.labels) for s in samples])
    assert abs(rows[0]["loss"] - reference) < 1e-4, (rows[0]["loss"], reference)
    assert rows[0]["tokens"] == sum(len(s.input_ids) for s in samples)  # no padding tokens in the row

    losses = [r["loss"] for r in run(dirs, "packed", lora=LEARNS, max_steps=12, packing=True)]
    assert len(losses) == 12 and sum(losses[-3:]) / 3 < losses[0] * 0.8, losses


# -- warm-up ratio -----------------------------------------------------------------------------------------------

def test_warmup_ratio_warms_up_over_that_share_of_steps(dirs):
    from transformers import get_linear_schedule_with_warmup

    rows = run(dirs, "warmup", max_steps=10, warmup_ratio=0.3)
    logged = [r["learning_rate"] for r in rows]
    # reference: transformers' linear schedule with ceil(0.3 x 10) = 3 warm-up steps, read after each step
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.01)
    schedule = get_linear_schedule_with_warmup(opt, num_warmup_steps=math.ceil(0.3 * 10), num_training_steps=10)
    expected = []
    for _ in range(10):
        expected.append(schedule.get_last_lr()[0])
        opt.step()
        schedule.step()
    assert logged == pytest.approx(expected, rel=1e-6), (logged, expected)
    assert logged[0] < logged[1] < logged[2] < logged[3] and logged[3] > logged[4]  # rises over 3 steps, then falls
    assert logged[3] == pytest.approx(0.01)


def test_warmup_steps_and_ratio_together_refused():
    with pytest.raises(BadInput, match="warmup_ratio: .*set one of them"):
        TrainingParams(warmup_steps=5, warmup_ratio=0.1)
    with pytest.raises(BadInput, match="warmup_ratio: 0.7 is outside"):
        TrainingParams(warmup_ratio=0.7)
    with pytest.raises(BadInput, match="training.warmup_ratio"):
        TrainConfig.from_dict({"output": "x", "dataset": {"path": "d.jsonl"},
                               "training": {"warmup_steps": 5, "warmup_ratio": 0.1}})


# -- train_on_prompt ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["instruction", "chat"])
def test_train_on_prompt_trains_every_token(fmt, dirs):
    tok = AutoTokenizer.from_pretrained(str(dirs["base"]))
    replies = [next(m["content"] for m in c if m["role"] == "assistant") for c in conversations(dirs["data"][fmt], fmt)]
    masked = load_files([dirs["data"][fmt]], fmt, tok, 256)
    full = load_files([dirs["data"][fmt]], fmt, tok, 256, train_on_prompt=True)
    assert [s.input_ids for s in full] == [s.input_ids for s in masked]
    for s in full:
        assert s.trained_tokens == len(s.input_ids) and s.labels == s.input_ids
    for s, reply in zip(masked, replies):
        trained = tok.decode([x for x in s.labels if x != IGNORE])
        assert 0 < s.trained_tokens < len(s.input_ids) and reply in trained and "?" not in trained.replace(reply, "")


def test_train_on_prompt_run_loss_is_plain_loss_over_whole_conversations(dirs):
    """With train_on_prompt the first step's loss is plain transformers' loss over every token of each
    conversation as the chat template renders it."""
    rows = run(dirs, "prompt-lr0", dataset={"train_on_prompt": True}, batch_size=16, max_steps=1, learning_rate=0.0)
    tok = AutoTokenizer.from_pretrained(str(dirs["base"]))
    ids = [tok.apply_chat_template(c, tokenize=True, return_dict=False)
           for c in conversations(dirs["data"]["chat"], "chat")]
    model = AutoModelForCausalLM.from_pretrained(str(dirs["base"]), dtype=torch.float32)
    reference = mean_token_loss(model, [(x, x) for x in ids])
    assert abs(rows[0]["loss"] - reference) < 1e-4, (rows[0]["loss"], reference)
    assert DatasetConfig(path="d.jsonl").train_on_prompt is False  # the default trains on the replies only


# -- precision ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("requested,cuda,bf16,chosen", [
    ("auto", False, False, "fp32"), ("auto", False, True, "bf16"), ("auto", True, True, "bf16"),
    ("auto", True, False, "fp16"),
    ("fp32", True, True, "fp32"), ("bf16", False, False, "bf16"), ("fp16", True, True, "fp16")])
def test_precision_choice(requested, cuda, bf16, chosen):
    p = precision.resolve(requested, cuda=cuda, bf16_supported=bf16)
    assert p.name == chosen
    assert p.dtype == {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[chosen]
    assert p.trainer_flags() == {"bf16": chosen == "bf16", "fp16": chosen == "fp16"}


def test_precision_refusals(dirs, tmp_path):
    with pytest.raises(BadInput, match="training.precision fp16: .*CUDA GPU"):
        precision.resolve("fp16", cuda=False, bf16_supported=False)
    with pytest.raises(BadInput, match="training.precision bf16: .*does not support bfloat16"):
        precision.resolve("bf16", cuda=True, bf16_supported=False)
    with pytest.raises(BadInput, match="precision: 'fp8' is not one of"):
        TrainingParams(precision="fp8")
    if not torch.cuda.is_available():  # this machine: fp16 is refused before anything is loaded or written
        with pytest.raises(BadInput, match="fp16"):
            run(dirs, "fp16", precision="fp16")
        assert not (dirs["runs"] / "fp16").exists()
        args = training_arguments(TrainingParams(), tmp_path, False)
        # auto on CPU: bf16 where it has bf16 instructions (AVX512-BF16, AMX), else fp32
        assert args.use_cpu and args.bf16 == precision.cpu_computes_bf16() and not args.fp16


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU's bf16 autocast")
def test_bf16_on_cpu_trains(dirs):
    rows = run(dirs, "bf16", lora=LEARNS, max_steps=12, precision="bf16")
    losses = [r["loss"] for r in rows]
    assert all(math.isfinite(x) for x in losses) and sum(losses[-3:]) / 3 < losses[0] * 0.8, losses
    from safetensors.torch import load_file

    weights = load_file(str(dirs["loras"] / "bf16" / "adapter_model.safetensors"))
    assert all(v.dtype == torch.float32 for v in weights.values())  # the adapter trained in float32
