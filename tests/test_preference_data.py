"""Preference data and the runs that learn from it, on the tiny Llama: every bad record is refused before
training with the file and record named; KTO learns from ratings and pairs; a DPO run stops with a checkpoint
and resumes from it like a supervised run; the run's metrics carry the reward margin and accuracy."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from webui.errors import BadInput
from webui.options.training import TrainConfig
from webui.training import preference
from webui.training.data import detect_format
from webui.training.runner import TrainingRunner
from webui.training.trainer import latest_checkpoint, train


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def pairs(n: int, messages: bool = False) -> list[dict]:
    rows = []
    for i in range(n):
        prompt, good, bad = f"Question {i}: what does the cow say?", f" MOO number {i}.", f" BAA number {i}."
        if messages:
            rows.append({"prompt": [{"role": "user", "content": prompt}],
                         "chosen": [{"role": "assistant", "content": good}],
                         "rejected": [{"role": "assistant", "content": bad}]})
        else:
            rows.append({"prompt": prompt, "chosen": good, "rejected": bad})
    return rows


def config(output: str, path, method: str = "dpo", **training) -> TrainConfig:
    t = {"max_steps": 4, "learning_rate": 0.01, "batch_size": 2, "save_steps": 2, "cutoff_len": 64, **training}
    return TrainConfig.from_dict({"base_model": "tiny-llama", "output": output, "method": method,
                                  "dataset": {"path": path if isinstance(path, list) else str(path),
                                              "format": "preference", "eval_fraction": 0},
                                  "lora": {"r": 4, "lora_alpha": 8}, "training": t})


@pytest.fixture
def dirs(tmp_path, tiny_models):
    return {"models": tiny_models["llama"].parent, "loras": tmp_path / "loras", "runs": tmp_path / "runs"}


@pytest.mark.parametrize("record, message", [
    ({"prompt": "Hi", "chosen": "Moo"}, "record 3: missing field(s) rejected"),
    ({"prompt": "Hi", "chosen": "  ", "rejected": "Baa"}, "record 3: field 'chosen' is empty"),
    ({"prompt": "Hi", "chosen": "Moo", "rejected": "Moo"}, "record 3: chosen and rejected are the same reply"),
    ({"prompt": "Hi", "completion": "Moo", "label": "yes"}, "record 3: field 'label' must be true or false"),
    ({"prompt": "Hi", "completion": "Moo"}, "record 3: missing field(s) label"),
    ({"prompt": [{"role": "user", "content": "Hi"}], "chosen": "Moo", "rejected": "Baa"},
     "record 3: mixes plain text with message lists"),
    ({"prompt": "Hi", "chosen": [{"role": "user", "content": "Moo"}], "rejected": [{"role": "assistant",
                                                                                     "content": "Baa"}]},
     "record 3: field 'chosen' must end with a assistant message"),
    ("just text", "record 3: expected an object"),
])
def test_a_bad_record_is_named_before_training(record, message, tmp_path, dirs):
    path = write_jsonl(tmp_path / "prefs.jsonl", pairs(2) + [record])
    with pytest.raises(BadInput, match=message.replace("(", r"\(").replace(")", r"\)")):
        preference.read(path)
    runner = TrainingRunner(dirs["runs"], dirs["models"], dirs["loras"])
    with pytest.raises(BadInput, match="dataset.path: prefs.jsonl record 3"):  # refused before a process starts
        runner.start(config("bad", path))
    assert not (dirs["runs"] / "bad" / "metrics.jsonl").exists()


def test_records_of_two_kinds_and_methods_that_need_the_other_kind(tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", pairs(2) + pairs(1, messages=True))
    with pytest.raises(BadInput, match="record 3: messages, but the records before it are text"):
        preference.read(path)
    ratings = write_jsonl(tmp_path / "ratings.jsonl", [{"prompt": "Hi", "completion": "Moo", "label": True}])
    with pytest.raises(BadInput, match="method dpo learns from pairs"):
        preference.load([ratings], "dpo")
    with pytest.raises(BadInput, match="kto needs replies rated good and replies rated bad"):
        preference.load([ratings], "kto")
    assert detect_format(path) == "preference" and detect_format(ratings) == "preference"
    plain = write_jsonl(tmp_path / "p.jsonl", pairs(2))
    assert preference.check_files([plain, ratings]) == 3
    with pytest.raises(BadInput, match="m.jsonl holds message lists and p.jsonl plain text"):
        preference.load([write_jsonl(tmp_path / "m.jsonl", pairs(1, messages=True)), plain], "dpo")
    rows, note = preference.load([plain, ratings], "dpo")
    assert len(rows) == 2 and "1 single rating(s) are for method kto" in note
    rows, _ = preference.load([tmp_path / "p.jsonl", ratings], "kto")  # each pair: one good, one bad reply
    assert sorted(r["label"] for r in rows) == [False, False, True, True, True]


def test_a_record_longer_than_cutoff_is_refused_naming_it(tmp_path, dirs):
    rows = pairs(3)
    rows[1]["chosen"] = " moo" * 200
    path = write_jsonl(tmp_path / "long.jsonl", rows)
    with pytest.raises(BadInput, match=r"long.jsonl record 2: prompt and chosen are \d+ tokens, over "
                                       r"training.cutoff_len 64"):
        train(config("long", path), dirs["models"], dirs["loras"], dirs["runs"], log=lambda m: None)
    assert not (dirs["loras"] / "long").exists()


def test_method_and_format_go_together():
    with pytest.raises(BadInput, match="method dpo learns from preference data"):
        TrainConfig.from_dict({"output": "x", "method": "dpo", "dataset": {"path": "a.jsonl", "format": "chat"}})
    with pytest.raises(BadInput, match="preference data trains with method dpo, orpo or kto"):
        TrainConfig.from_dict({"output": "x", "dataset": {"path": "a.jsonl", "format": "preference"}})
    with pytest.raises(BadInput, match="training.packing"):
        TrainConfig.from_dict({"output": "x", "method": "orpo", "dataset": {"path": "a.jsonl", "format": "preference"},
                               "training": {"packing": True}})
    cfg = TrainConfig.from_dict({"output": "x", "method": "kto", "dataset": {"path": "a.jsonl", "format": "preference"},
                                 "training": {"beta": 0.3}})
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg and cfg.to_dict()["method"] == "kto"


def test_kto_learns_from_ratings_and_pairs(tmp_path, dirs):
    ratings = [{"prompt": f"Say {i}", "completion": f" MOO {i}", "label": True} for i in range(3)]
    ratings += [{"prompt": f"Say {i}", "completion": f" BAA {i}", "label": False} for i in range(3)]
    files = [str(write_jsonl(tmp_path / "pairs.jsonl", pairs(4))), str(write_jsonl(tmp_path / "r.jsonl", ratings))]
    out = train(config("kto", files, method="kto", max_steps=3), dirs["models"], dirs["loras"], dirs["runs"],
                log=lambda m: None)
    assert (out / "adapter_model.safetensors").is_file()
    status = json.loads((dirs["runs"] / "kto" / "status.json").read_text())
    assert status["state"] == "done" and status["samples"] == 14  # 6 ratings + 4 pairs as 8
    rows = [json.loads(line) for line in (dirs["runs"] / "kto" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]


def _wait(predicate, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError("timed out")


def test_dpo_stops_with_a_checkpoint_and_resumes(tmp_path, dirs):
    path = write_jsonl(tmp_path / "prefs.jsonl", pairs(16))
    runner = TrainingRunner(dirs["runs"], dirs["models"], dirs["loras"])
    cfg = config("dpo-stop", path, max_steps=400, save_steps=3, learning_rate=0.001)
    runner.start(cfg)
    _wait(lambda: runner.view("dpo-stop").step >= 4)
    runner.stop("dpo-stop")
    view = runner.view("dpo-stop")
    assert view.state == "stopped", view.log_tail
    assert latest_checkpoint(dirs["runs"] / "dpo-stop").name == f"checkpoint-{view.step}"
    cfg.training.max_steps = view.step + 2
    runner.start(cfg)
    _wait(lambda: runner.view("dpo-stop").state in ("done", "failed"))
    assert runner.view("dpo-stop").state == "done", runner.view("dpo-stop").log_tail
    status = json.loads((dirs["runs"] / "dpo-stop" / "status.json").read_text())
    assert status["resumed_from"] == f"checkpoint-{view.step}"
    rows = [json.loads(line) for line in (dirs["runs"] / "dpo-stop" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r][-2:] == [view.step + 1, view.step + 2]
    assert all("margin" in r and "accuracy" in r for r in rows if "loss" in r)
    adapter = json.loads((dirs["loras"] / "dpo-stop" / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and not (dirs["loras"] / "dpo-stop" / "ref").exists()


def test_the_preview_shows_each_reply_after_its_prompt_with_only_the_reply_trained(tmp_path, tiny_models):
    from transformers import AutoTokenizer

    from webui.training.data import IGNORE, preview

    tok = AutoTokenizer.from_pretrained(str(tiny_models["llama"]))
    rows, _ = preference.load([write_jsonl(tmp_path / "p.jsonl", pairs(3))], "dpo")
    shown = preference.preview_samples(tok, rows, 64)
    assert len(shown) == 4  # two pairs: chosen, rejected, chosen, rejected
    prompt_len = len(tok(rows[0]["prompt"])["input_ids"])
    assert all(label == IGNORE for label in shown[0].labels[:prompt_len])
    assert shown[0].labels[prompt_len:] == shown[0].input_ids[prompt_len:]
    text = preview(tok, shown, n=4)
    assert "MOO number 0" in text and "BAA number 0" in text and "⟦" in text
