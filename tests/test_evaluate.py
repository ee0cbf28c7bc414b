"""Evaluating adapters (`python -m webui eval`, the Evaluate tab's engine): loss and perplexity equal a plain
transformers computation (float and GPTQ) and llama-cpp-python's own logits over the tokens training would
learn; an adapter trained on a style scores best on that style; greedy side-by-side answers equal plain
transformers / PEFT; the CLI writes the report with the contract's keys; the HTML page shows the table and the
chart in Chromium; bad input names the file, line or adapter and changes nothing; a cancelled run writes
nothing."""
from __future__ import annotations

import json
import math
import subprocess
import sys
import threading

import pytest
import torch

from tests.browser import ARTIFACTS
from tests.helpers import ROOT, converted_lora, peft_model, peft_reference, reference_greedy, write_data
from webui.engine import Engine
from webui.errors import BadInput, Incompatible, NotFound
from webui.evaluate import page
from webui.evaluate.run import evaluate, write_report
from webui.options.config import EvalConfig, ModelSpec
from webui.training.data import IGNORE, load_samples

RESULT_KEYS = {"name", "adapters", "loss", "perplexity", "tokens", "delta_loss_vs_base", "ci95"}


@pytest.fixture(scope="module")
def engine(gguf_models, llama_loras):
    e = Engine(gguf_models, llama_loras)
    e.load(ModelSpec(model="tiny-llama", loader="transformers"))
    yield e
    e.unload()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_data(tmp_path_factory.mktemp("eval-data"))


def _reference_loss(model, samples) -> tuple[float, int, list[float]]:
    """Mean NLL over the trained tokens as transformers computes a causal LM's loss (shifted labels, -100
    ignored), summed over samples; also each sample's own mean."""
    total, count, per_sample = 0.0, 0, []
    with torch.no_grad():
        for s in samples:
            logits = model(input_ids=torch.tensor([s.input_ids])).logits[0, :-1].double()
            labels = torch.tensor(s.labels[1:])
            nll = torch.nn.functional.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="sum").item()
            n = int((labels != IGNORE).sum())
            total, count = total + nll, count + n
            per_sample.append(nll / n)
    return total / count, count, per_sample


def _config(tmp_path, dataset, fmt, **kw) -> EvalConfig:
    return EvalConfig(dataset=str(dataset), format=fmt, out=str(tmp_path / "report.html"), **kw)


def test_transformers_perplexity_equals_plain_transformers(engine, gguf_models, llama_loras, data, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    report = evaluate(engine, _config(tmp_path, data["chat"], "chat", lora=["A"], batch_size=5))
    folder = gguf_models / "tiny-llama"
    tok = AutoTokenizer.from_pretrained(str(folder))
    samples = load_samples(data["chat"], "chat", tok, 256, 0)  # training's own samples, from the HF tokenizer
    plain = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    _, with_a = peft_model(folder, {"A": (llama_loras / "A", 1.0)})
    base, a = report["results"]
    for got, model in ((base, plain), (a, with_a)):
        loss, count, per_sample = _reference_loss(model, samples)
        assert got["tokens"] == count and report["dataset"]["tokens"] == count
        assert got["loss"] == pytest.approx(loss, abs=1e-4)
        assert got["perplexity"] == pytest.approx(math.exp(loss), rel=1e-4)
        assert got["per_sample_loss"] == pytest.approx(per_sample, abs=1e-4)
    assert report["dataset"] == {"path": str(data["chat"]), "format": "chat", "samples": 12, "tokens": count}
    assert a["delta_loss_vs_base"] == pytest.approx(a["loss"] - base["loss"])
    assert a["ci95"][0] <= a["delta_loss_vs_base"] <= a["ci95"][1]
    assert base["tokens_per_s"] > 0 and a["tokens_per_s"] > 0
    assert engine.active_adapters == {}


def test_llamacpp_loss_agrees_with_llama_cpp_python_logits(gguf_models, llama_loras, data, tmp_path):
    import llama_cpp
    import numpy as np
    from transformers import AutoTokenizer

    e = Engine(gguf_models, llama_loras)
    e.load(ModelSpec(model="tiny-llama.gguf", loader="llamacpp"))
    try:
        report = evaluate(e, _config(tmp_path, data["raw"], "raw", lora=["A"], cutoff_len=96))
    finally:
        e.unload()
    tok = AutoTokenizer.from_pretrained(str(gguf_models / "tiny-llama"))
    samples = load_samples(data["raw"], "raw", tok, 96, 0)
    for got, lora in zip(report["results"], (None, converted_lora(llama_loras, "A"))):
        extra = {"lora_path": str(lora), "lora_scale": 1.0} if lora else {}
        llm = llama_cpp.Llama(str(gguf_models / "tiny-llama.gguf"), n_ctx=256, logits_all=True, verbose=False,
                              flash_attn=True,  # as the loader runs it (llama-server's default on CPU)
                              **extra)
        total, count = 0.0, 0
        for s in samples:
            llm.reset()
            llm.eval(s.input_ids)
            logits = torch.tensor(np.array(llm.scores[: len(s.input_ids) - 1]), dtype=torch.float64)
            total += torch.nn.functional.cross_entropy(logits, torch.tensor(s.labels[1:]), reduction="sum").item()
            count += len(s.input_ids) - 1
        llm.close()
        assert got["tokens"] == count
        assert got["loss"] == pytest.approx(total / count, abs=1e-4)
        assert got["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-4)
    assert report["loader"] == "llamacpp" and report["results"][1]["loss"] != report["results"][0]["loss"]


def test_gptq_loss_equals_plain_transformers_on_the_same_gptq_model(gptq_dirs, data, tmp_path):
    from transformers import AutoTokenizer

    models, loras = gptq_dirs
    e = Engine(models, loras)
    e.load(ModelSpec(model="tiny-gptq", loader="gptq"))
    try:
        report = evaluate(e, _config(tmp_path, data["instruction"], "instruction", lora=["A"]))
    finally:
        e.unload()
    tok = AutoTokenizer.from_pretrained(str(models / "tiny-gptq"))
    samples = load_samples(data["instruction"], "instruction", tok, 256, 0)
    _, with_a = peft_model(models / "tiny-gptq", {"A": (loras / "A", 1.0)})
    loss_a, count, _ = _reference_loss(with_a, samples)
    with with_a.disable_adapter():
        loss_base, _, _ = _reference_loss(with_a, samples)
    base, a = report["results"]
    assert base["tokens"] == a["tokens"] == count
    assert base["loss"] == pytest.approx(loss_base, abs=1e-4) and a["loss"] == pytest.approx(loss_a, abs=1e-4)
    assert abs(a["loss"] - base["loss"]) > 0.01  # the adapter is applied


def test_an_adapter_trained_on_a_style_scores_best_on_that_style(gguf_models, tmp_path):
    from webui.options.training import TrainConfig
    from webui.training.trainer import train

    styles = {"keeper": "The lighthouse keeper counts the ships. One, two, three ships pass by. ",
              "colors": "Red and green and blue, the painter mixes colors all day long. "}
    loras = tmp_path / "loras"
    for name, text in styles.items():
        (tmp_path / f"{name}.txt").write_text(text * 40)
        train(TrainConfig.from_dict({
            "base_model": "tiny-llama", "output": name, "dataset": {"path": str(tmp_path / f"{name}.txt"),
                                                                    "format": "raw", "eval_fraction": 0},
            "lora": {"r": 8, "lora_alpha": 16}, "training": {"max_steps": 12, "learning_rate": 0.01,
                                                             "batch_size": 4, "cutoff_len": 64}}),
              gguf_models, loras, tmp_path / "runs", log=lambda m: None)
    held_out = tmp_path / "keeper-held-out.txt"  # the keeper's style, in sentences it was not trained on
    held_out.write_text("The lighthouse keeper counts the boats. Four, five, six ships pass by the keeper. " * 6)
    e = Engine(gguf_models, loras)
    e.load(ModelSpec(model="tiny-llama", loader="transformers"))
    try:
        report = evaluate(e, _config(tmp_path, held_out, "raw", lora=["keeper", "colors"], cutoff_len=64))
    finally:
        e.unload()
    loss = {r["name"]: r["loss"] for r in report["results"]}
    keeper = report["results"][1]
    assert loss["keeper"] < loss["base"] and loss["keeper"] < loss["colors"], loss
    assert keeper["ci95"][1] < 0 and keeper["verdict"] == "better than base"
    print(f"\nheld-out keeper-style text: {({n: round(v, 3) for n, v in loss.items()})}")


def test_an_adapter_overfit_on_narrow_data_is_worse_at_general_text(embedded_folder, tmp_path):
    """SmolLM2 (a real pretrained base: a random tiny model gets better at English from any English text) with an
    adapter overfit on one repeated nonsense line: it learns that line, and its loss on the built-in general English
    text rises, with a 95% interval above 0; the base's own general-text difference is exactly 0."""
    from webui.options.training import TrainConfig
    from webui.training.trainer import train

    narrow = tmp_path / "narrow.txt"
    narrow.write_text("Blorp zig the quantum toaster, blorp zag the marmalade moon. " * 60)
    loras = tmp_path / "loras"
    train(TrainConfig.from_dict({
        "base_model": embedded_folder.name, "output": "narrow",
        "dataset": {"path": str(narrow), "format": "raw", "eval_fraction": 0},
        "lora": {"r": 8, "lora_alpha": 16}, "training": {"max_steps": 10, "learning_rate": 0.005, "batch_size": 4,
                                                         "cutoff_len": 48}}),
          embedded_folder.parent, loras, tmp_path / "runs", log=lambda m: None)
    e = Engine(embedded_folder.parent, loras)
    e.load(ModelSpec(model=embedded_folder.name, loader="transformers"))
    try:
        report = evaluate(e, _config(tmp_path, narrow, "raw", lora=["narrow"], cutoff_len=48, max_samples=8))
    finally:
        e.unload()
    base, adapter = report["results"]
    assert adapter["delta_loss_vs_base"] < 0  # it did learn its narrow line
    assert base["general_delta_vs_base"] == 0.0 and base["general_ci95"] == [0.0, 0.0]
    assert adapter["general_delta_vs_base"] > 0 and adapter["general_ci95"][0] > 0, adapter["general_ci95"]
    assert adapter["general_verdict"] == "worse than base"
    assert 'class="general"' in page.render(report)
    print(f"\ngeneral text: base {base['general_loss']:.3f}, overfit adapter +{adapter['general_delta_vs_base']:.3f} "
          f"{adapter['general_ci95']}")


def test_answers_side_by_side_equal_plain_transformers_and_peft(engine, gguf_models, llama_loras, data, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The quick brown fox\n\nHello! How can I\n")
    report = evaluate(engine, _config(tmp_path, data["raw"], "raw", lora=["A", "B"], prompts=str(prompts),
                                      max_new_tokens=8, max_samples=2))
    folder = gguf_models / "tiny-llama"
    assert [g["prompt"] for g in report["generations"]] == ["The quick brown fox", "Hello! How can I"]
    for g in report["generations"]:
        assert list(g["outputs"]) == ["base", "A", "B"]
        assert g["outputs"]["base"] == reference_greedy(folder, g["prompt"], 8)
        for name in ("A", "B"):
            assert g["outputs"][name] == peft_reference(folder, {name: (llama_loras / name, 1.0)}, g["prompt"], 8)[0]
    assert report["dataset"]["samples"] == 2 and len(report["samples"]) == 2


def test_a_weight_zero_stack_is_the_base_and_the_interval_is_reproducible(engine, data, tmp_path):
    cfg = _config(tmp_path, data["instruction"], "instruction", stack=["A=0"], lora=["B"], seed=7)
    first, second = evaluate(engine, cfg), evaluate(engine, cfg)
    base, b, zero = first["results"]
    assert zero["name"] == "A=0" and zero["adapters"] == {"A": 0.0}
    assert abs(zero["delta_loss_vs_base"]) < 1e-6 and zero["verdict"] == "no clear difference"
    assert second["results"][1]["ci95"] == b["ci95"]  # the same seed, the same interval
    assert base["ci95"] == [0.0, 0.0] and base["delta_loss_vs_base"] == 0.0


def test_sweep_end_points_are_the_base_and_adapter_rows(engine, data, tmp_path):
    """Scale 0 is the base's loss and scale 1 the adapter's (or the stack's) row, exactly; the scales between are
    the adapter at that weight, as a stack {A: s} scores alone; the page plots the curve."""
    cfg = _config(tmp_path, data["raw"], "raw", lora=["A"], stack=["A=1,B=0.5"], max_samples=4,
                  sweep=["A=0,0.5,1", "A=1,B=0.5=0,1,2"])
    report = evaluate(engine, cfg)
    rows = {r["name"]: r for r in report["results"]}
    a, stack = report["sweeps"]
    assert a["target"] == "A" and [p["scale"] for p in a["points"]] == [0, 0.5, 1]
    assert a["points"][0]["loss"] == rows["base"]["loss"] and a["points"][0]["delta_loss_vs_base"] == 0
    assert a["points"][-1]["loss"] == rows["A"]["loss"] and a["points"][-1]["ci95"] == rows["A"]["ci95"]
    half = evaluate(engine, _config(tmp_path, data["raw"], "raw", stack=["A=0.5"], max_samples=4, general=False))
    assert a["points"][1]["loss"] == half["results"][1]["loss"] != rows["A"]["loss"]
    assert stack["target"] == "A=1,B=0.5" and stack["adapters"] == {"A": 1.0, "B": 0.5}
    assert [p["loss"] for p in stack["points"][:2]] == [rows["base"]["loss"], rows["A=1,B=0.5"]["loss"]]
    assert rows["base"]["general_delta_vs_base"] == 0.0 and report["general_text"]["tokens"] > 1000
    assert half["general_text"] is None and "general_loss" not in half["results"][0]
    html = page.render(report)
    assert 'id="sweep-chart"' in html and html.count('class="sweep-point"') == 6
    with pytest.raises(BadInput, match="sweep: 'A' must be TARGET=S1,S2"):
        _config(tmp_path, data["raw"], "raw", sweep=["A"])


def test_cancel_stops_the_run_and_writes_nothing(engine, data, tmp_path):
    cancel = threading.Event()
    seen = []

    def progress(fraction, message):
        seen.append(message)
        cancel.set()  # stop after the first batch

    cfg = _config(tmp_path, data["chat"], "chat", lora=["A", "B"], batch_size=2)
    assert evaluate(engine, cfg, progress, cancel) is None
    assert len(seen) == 1 and not (tmp_path / "report.html").exists() and not (tmp_path / "report.json").exists()
    assert engine.active_adapters == {}


@pytest.mark.parametrize("case", ["empty", "malformed", "no-field", "incompatible", "unknown", "long-sample",
                                  "long-prompt", "bad-prompts", "bad-stack", "bad-out"])
def test_bad_input_names_the_problem_and_changes_nothing(case, engine, data, tmp_path):
    dataset, fmt, kw = data["chat"], "chat", {}
    if case == "empty":
        (dataset := tmp_path / "empty.jsonl").write_text("\n")
        error, match = BadInput, "empty.jsonl is empty"
    elif case == "malformed":
        (dataset := tmp_path / "bad.jsonl").write_text(data["chat"].read_text().splitlines()[0] + "\n{oops\n")
        error, match = BadInput, "bad.jsonl line 2 is not valid JSON"
    elif case == "no-field":
        (dataset := tmp_path / "inst.json").write_text(json.dumps([{"instruction": "Hi", "output": "Yo"},
                                                                    {"instruction": "Hi"}]))
        fmt, error, match = "instruction", BadInput, "inst.json record 2: missing field 'output'"
    elif case == "incompatible":
        kw, error, match = {"lora": ["A", "other"]}, Incompatible, "other does not fit tiny-llama"
    elif case == "unknown":
        kw, error, match = {"lora": ["nope"]}, NotFound, "nope"
    elif case == "long-sample":
        lines = data["chat"].read_text().splitlines()
        long = json.dumps({"messages": [{"role": "user", "content": "count " * 300},
                                        {"role": "assistant", "content": "ok"}]})
        (dataset := tmp_path / "long.jsonl").write_text("\n".join([lines[0], lines[1], long]))
        kw, error, match = {"cutoff_len": 0}, BadInput, r"long.jsonl record 3: \d+ tokens do not fit the context"
    elif case == "long-prompt":
        (prompts := tmp_path / "prompts.txt").write_text("Hello\n" + "count " * 300 + "\n")
        kw, error, match = {"prompts": str(prompts)}, BadInput, "prompts.txt line 2: the prompt has"
    elif case == "bad-prompts":
        (prompts := tmp_path / "prompts.json").write_text(json.dumps(["Hello", 3]))
        kw, error, match = {"prompts": str(prompts)}, BadInput, "prompts.json item 2: a prompt must be"
    elif case == "bad-stack":
        kw, error, match = {"stack": ["A=x"]}, BadInput, "stack: 'A=x'"
    else:
        kw, error, match = {"out": str(tmp_path / "report.txt")}, BadInput, "must end in .json or .html"
    engine.set_adapters({"B": 1.0})
    try:
        with pytest.raises(error, match=match):
            evaluate(engine, EvalConfig(**{"dataset": str(dataset), "format": fmt,
                                           "out": str(tmp_path / "report.html"), **kw}))
        assert engine.active_adapters == {"B": 1.0}
        assert not list(tmp_path.glob("report.*"))
    finally:
        engine.set_adapters({})


def test_cli_writes_the_report_with_the_contract_keys(gguf_models, llama_loras, data, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('"Color number 1?"\n{"prompt": "Color number 2?"}\n')
    out = tmp_path / "reports" / "eval.html"
    proc = subprocess.run(
        [sys.executable, "-m", "webui", "eval", "--model", "tiny-llama", "--loader", "transformers",
         "--models-dir", str(gguf_models), "--loras-dir", str(llama_loras), "--lora", "A", "B",
         "--stack", "A=1,B=0.5", "--dataset", str(data["chat"]), "--format", "chat", "--prompts", str(prompts),
         "--max-new-tokens", "6", "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[-2:] == [str(out), str(out.with_suffix(".json"))]
    report = json.loads(out.with_suffix(".json").read_text())
    assert {"model", "loader", "dataset", "results", "generations"} <= set(report)
    assert report["model"] == "tiny-llama" and report["loader"] == "transformers"
    assert set(report["dataset"]) == {"path", "format", "samples", "tokens"}
    assert [r["name"] for r in report["results"]] == ["base", "A", "B", "A=1,B=0.5"]
    for r in report["results"]:
        assert RESULT_KEYS <= set(r) and len(r["ci95"]) == 2 and len(r["per_sample_loss"]) == 12
        assert r["perplexity"] == pytest.approx(math.exp(r["loss"]))
    assert report["results"][3]["adapters"] == {"A": 1.0, "B": 0.5}
    assert [g["prompt"] for g in report["generations"]] == ["Color number 1?", "Color number 2?"]
    assert all(set(g["outputs"]) == {"base", "A", "B", "A=1,B=0.5"} for g in report["generations"])
    assert "<svg" in out.read_text() and "https://" not in out.read_text().split("</style>")[0]

    bad = subprocess.run([sys.executable, "-m", "webui", "eval", "--model", "tiny-llama", "--models-dir",
                          str(gguf_models), "--loras-dir", str(llama_loras), "--lora", "other", "--dataset",
                          str(data["chat"]), "--format", "chat", "--out", str(tmp_path / "bad.json")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and not (tmp_path / "bad.json").exists()
    errors = [line for line in bad.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: other does not fit tiny-llama"), bad.stderr[-2000:]


def test_html_report_shows_the_table_and_the_chart_in_chromium(browser, engine, data, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Color number 1?\nSay hello 2\n")
    report = evaluate(engine, _config(tmp_path, data["chat"], "chat", lora=["A", "B"], stack=["A=1,B=0.5"],
                                      prompts=str(prompts), max_new_tokens=6))
    html_path, json_path = write_report(report, tmp_path / "report.html")
    assert json.loads(json_path.read_text())["results"] == report["results"]
    page = browser.new_context(viewport={"width": 1280, "height": 900}, offline=True).new_page()
    page.goto(html_path.as_uri())
    assert page.locator("table.results tr.result").count() == 4
    assert page.locator("table.results tr.result").first.inner_text().startswith("base")
    bars = page.locator("#perplexity-chart rect.bar")
    assert bars.count() == 4 and all(bars.nth(i).bounding_box()["width"] > 1 for i in range(4))
    assert page.locator("table.samples tr.sample").count() == 12
    assert page.locator("table.generations tr.generation").count() == 2
    assert "lower loss than the base on" in page.inner_text("body")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "eval-report.png"), full_page=True)
    page.close()
