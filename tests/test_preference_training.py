"""Preference tuning (method dpo / orpo) against plain TRL + PEFT run in the test with the same settings, on the
embedded SmolLM2: 40 synthetic pairs whose chosen replies begin "MOO! said the cow." and rejected ones "BAA! said
the sheep.". Each adapter's margin on held-out pairs is computed here with plain transformers + PEFT (summed
log-probability of the chosen reply minus the rejected one), and `eval --format preference` must report the
same numbers.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from webui.options.config import EvalConfig, ModelSpec
from webui.options.training import TrainConfig
from webui.training.trainer import train

TOPICS = ["the weather", "breakfast", "the farm", "a good book", "the moon", "music", "the sea", "trains", "gardening",
          "cooking", "the city", "winter", "dogs", "coffee", "mountains", "history", "painting", "football", "rain",
          "bread", "computers", "the river", "birds", "summer", "tea", "the forest", "chess", "sleep", "flowers",
          "the desert", "bicycles", "honey", "snow", "apples", "stars", "boats", "cheese", "clocks", "maps", "lamps",
          # held out
          "bridges", "kites", "candles", "shoes", "hats", "bells", "tigers", "pianos", "islands", "buses", "soup",
          "gloves"]
SETTINGS = {"max_steps": 6, "batch_size": 4, "learning_rate": 5e-4, "cutoff_len": 128, "beta": 0.1,
            "gradient_checkpointing": False, "save_steps": 1000, "logging_steps": 1, "seed": 42}
LORA = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": "all-linear"}


def pair(topic: str) -> dict:
    return {"prompt": [{"role": "user", "content": f"Say something about {topic}."}],
            "chosen": [{"role": "assistant", "content": f"MOO! said the cow. I like {topic}."}],
            "rejected": [{"role": "assistant", "content": f"BAA! said the sheep. I like {topic}."}]}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pairs")
    return {"train": write_jsonl(folder / "train.jsonl", [pair(t) for t in TOPICS[:40]]),
            "heldout": write_jsonl(folder / "heldout.jsonl", [pair(t) for t in TOPICS[40:]])}


def plain_trl(method: str, base: Path, train_file: Path, out: Path) -> Path:
    """What a user of TRL writes: the trainer, a LoraConfig, the same settings as ours."""
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if method == "dpo":
        from trl import DPOConfig as Config
        from trl import DPOTrainer as Trainer
    else:
        from trl.experimental.orpo import ORPOConfig as Config
        from trl.experimental.orpo import ORPOTrainer as Trainer
    tok = AutoTokenizer.from_pretrained(str(base))
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    s = SETTINGS
    extra = {"max_completion_length": s["cutoff_len"]} if method == "orpo" else {}
    args = Config(output_dir=str(out / "run"), max_steps=s["max_steps"], per_device_train_batch_size=s["batch_size"],
                  learning_rate=s["learning_rate"], beta=s["beta"], max_length=s["cutoff_len"], seed=s["seed"],
                  lr_scheduler_type="linear", warmup_steps=0, optim="adamw_torch", weight_decay=0.0, bf16=False,
                  gradient_checkpointing=False, save_strategy="no", report_to=[], use_cpu=True, logging_steps=1,
                  disable_tqdm=True, **extra)
    trainer = Trainer(model=model, args=args, processing_class=tok,
                      train_dataset=load_dataset("json", data_files=str(train_file))["train"],
                      peft_config=LoraConfig(task_type="CAUSAL_LM", **LORA))
    trainer.train()
    trainer.model.save_pretrained(str(out / "adapter"))
    return out / "adapter"


def reply_logprob(model, tok, prompt: list[dict], reply: list[dict]) -> float:
    start = len(tok.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True, return_dict=True)
                ["input_ids"])
    ids = tok.apply_chat_template(prompt + reply, tokenize=True, return_dict=True)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    logp = torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    return float(logp[start - 1:].sum())


def heldout_margins(base: Path, adapter: Path | None, heldout: Path) -> list[float]:
    """Plain transformers (+ PEFT): chosen minus rejected, summed log-probabilities of the reply, per pair."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base))
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    if adapter:
        model = PeftModel.from_pretrained(model, str(adapter))
    model.eval()
    rows = [json.loads(line) for line in heldout.read_text().splitlines()]
    return [reply_logprob(model, tok, r["prompt"], r["chosen"]) - reply_logprob(model, tok, r["prompt"], r["rejected"])
            for r in rows]


def summary(margins: list[float]) -> tuple[float, float]:
    return sum(margins) / len(margins), sum(m > 0 for m in margins) / len(margins)


@pytest.mark.parametrize("method", ["dpo", "orpo"])
def test_preference_training_matches_plain_trl(method, data, embedded_folder, tmp_path):
    loras, runs = tmp_path / "loras", tmp_path / "runs"
    cfg = TrainConfig.from_dict({"base_model": str(embedded_folder), "output": f"moo-{method}", "method": method,
                                 "dataset": {"path": str(data["train"]), "format": "preference", "eval_fraction": 0},
                                 "lora": LORA, "training": SETTINGS})
    ours = train(cfg, embedded_folder.parent, loras, runs, log=lambda m: None)
    assert not (ours / "ref").exists()  # the trained adapter alone, not TRL's reference copy
    plain = plain_trl(method, embedded_folder, data["train"], tmp_path / "plain")

    base_m, base_w = summary(heldout_margins(embedded_folder, None, data["heldout"]))
    ours_margins = heldout_margins(embedded_folder, ours, data["heldout"])
    ours_m, ours_w = summary(ours_margins)
    plain_m, plain_w = summary(heldout_margins(embedded_folder, plain, data["heldout"]))
    print(f"{method} held-out margin / win rate: base {base_m:+.3f} {base_w:.0%}, ours {ours_m:+.3f} {ours_w:.0%}, "
          f"plain TRL {plain_m:+.3f} {plain_w:.0%}")
    assert plain_m > base_m + 1 and plain_w > base_w  # the reference itself learned the preference
    assert ours_m > base_m + 1 and ours_w > base_w
    # the same settings reach the same level: within a fifth of the plain run's gain, and its win rate
    assert abs(ours_m - plain_m) <= 0.2 * (plain_m - base_m), (ours_m, plain_m, base_m)
    assert ours_w >= plain_w - 1 / len(ours_margins)

    metrics = [json.loads(line) for line in (runs / f"moo-{method}" / "metrics.jsonl").read_text().splitlines()]
    margins = [m["margin"] for m in metrics if "margin" in m]
    assert len(margins) == SETTINGS["max_steps"] and margins[-1] > margins[0]  # what the chart and status show
    assert all("accuracy" in m for m in metrics if "margin" in m)

    if method == "dpo":  # the evaluation reports the margins computed above, base and adapter
        from webui.engine import Engine
        from webui.evaluate.run import evaluate

        engine = Engine(embedded_folder.parent, loras)
        engine.load(ModelSpec(model=str(embedded_folder), loader="transformers", dtype="float32"))
        try:
            report = evaluate(engine, EvalConfig(dataset=str(data["heldout"]), format="preference",
                                                 out=str(tmp_path / "r.json"), lora=[f"moo-{method}"], general=False))
        finally:
            engine.unload()
        by_name = {r["name"]: r for r in report["results"]}
        assert by_name["base"]["pref_margin"] == pytest.approx(base_m, abs=1e-3)
        assert by_name["base"]["pref_win_rate"] == pytest.approx(base_w)
        assert by_name[f"moo-{method}"]["pref_margin"] == pytest.approx(ours_m, abs=1e-3)
        assert by_name[f"moo-{method}"]["pref_win_rate"] == pytest.approx(ours_w)
        low, high = by_name[f"moo-{method}"]["pref_ci95"]
        assert low <= ours_m <= high and low > by_name["base"]["pref_ci95"][1]
        from webui.evaluate.page import results_table  # what the Evaluate tab and the HTML report show

        table = results_table(report)
        assert "win rate" in table and f'class="pref-margin">{by_name[f"moo-{method}"]["pref_margin"]:+.3f}<' in table
