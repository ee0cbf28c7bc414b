"""Training from the browser: fill the Training tab's short form, start a run, watch the progress and the
loss chart update, and apply the finished adapter to the chat with one click (no base reload); the history of
past runs with their loss curves overlaid, smoothed and on a log scale."""
import math
import time

import pytest

from tests.browser import open_app, screenshot, set_number, tab, wait_text
from tests.helpers import write_data, write_run
from tests.test_training_charts import tensorboard_smooth


def _fill(page, elem_id: str, value) -> None:
    box = page.locator(f"#{elem_id} textarea, #{elem_id} input").first
    box.fill(str(value))
    box.press("Enter")


def test_train_from_the_training_tab(browser, start_app, tiny_models, tmp_path):
    data = write_data(tmp_path / "data")
    models = tiny_models["llama"].parent
    app = start_app("--model", "tiny-llama", "--models-dir", str(models), "--loras-dir", str(tmp_path / "loras"),
                    "--runs-dir", str(tmp_path / "runs"), "--user-dir", str(tmp_path / "user"))
    page = open_app(browser, app.url)
    tab(page, "Training")
    _fill(page, "train-output", "ui-trained")
    _fill(page, "train-base", "tiny-llama")
    _fill(page, "train-data-path", data["instruction"])
    page.locator("#train-data-format input").first.fill("instruction")
    page.locator("#train-data-format input").first.press("Enter")
    _fill(page, "train-opt-max_steps", 24)
    _fill(page, "train-opt-learning_rate", 0.01)
    _fill(page, "train-opt-cutoff_len", 64)
    page.click("#train-preview-go")
    assert "samples" in wait_text(lambda: page.input_value("#train-preview textarea"), timeout=60)
    assert "⟦" in page.input_value("#train-preview textarea")

    page.click("#train-start")
    assert "Started" in wait_text(lambda: page.inner_text("#train-notice"), timeout=30)
    seen_running = wait_text(lambda: page.inner_text("#train-status"), timeout=60)
    assert "ui-trained" in seen_running
    status = wait_text(lambda: page.inner_text("#train-status").split("·")[1].strip(), "done", timeout=180)
    assert status == "done", page.inner_text("#train-status")
    assert "loss" in page.inner_text("#train-status")
    assert page.locator("#train-chart canvas, #train-chart svg").count() > 0  # the chart is drawn
    # and its line is stroked: a chart created empty (every run started on a fresh page) drew axes and an invisible
    # line until the page was reloaded (issue 29, item 2)
    assert wait_text(lambda: str(_stroked_lines(page, "train-chart") > 0), "True", timeout=30) == "True"
    screenshot(page, "tab-training-run")

    page.click("#train-apply")
    assert "answering" in wait_text(lambda: page.inner_text("#train-notice"), timeout=30)
    tab(page, "Chat")
    # the status line refreshes every few seconds: wait for it to show the adapter
    assert wait_text(lambda: page.inner_text("#chat-status"), "ui-trained × 1", timeout=20,
                     key=lambda t: "ui-trained × 1" if "ui-trained × 1" in t else t) == "ui-trained × 1"
    tab(page, "Model")  # listed in the LoRA panel, checked, without a reload of anything
    assert page.locator("#lora-on-ui-trained input[type=checkbox]").is_checked()


def test_training_tab_upload_box_and_empty_chart_read_cleanly(browser, start_app, tiny_models, tmp_path):
    """Before any run: the upload box shows its whole text (nothing cut by a fixed height) and the empty loss
    chart shows no "null" (it used to draw a placeholder row of None)."""
    models = tiny_models["llama"].parent
    app = start_app("--model", "tiny-llama", "--models-dir", str(models), "--loras-dir", str(tmp_path / "loras"),
                    "--runs-dir", str(tmp_path / "runs"), "--user-dir", str(tmp_path / "user"))
    page = open_app(browser, app.url)
    tab(page, "Training")
    page.wait_for_selector("#train-chart svg", timeout=30_000)
    box = page.locator("#train-upload .upload-container").first
    assert "Click to Upload" in box.inner_text()
    assert box.evaluate("e => e.scrollHeight <= e.clientHeight"), "the upload box cuts its text"
    assert "null" not in page.inner_text("#train-chart")
    assert "No training run yet" in wait_text(lambda: page.inner_text("#train-status"), timeout=30)


def _stroked_lines(page, elem_id: str) -> int:
    """How many line marks of a Vega chart are drawn with a visible stroke (axes and the background excluded)."""
    return page.evaluate(f"""Array.from(document.querySelectorAll('#{elem_id} path')).filter(p => {{
        const s = p.getAttribute('stroke');
        return s && s !== 'transparent' && s !== 'none' && !p.classList.contains('background')
            && (p.getAttribute('d') || '').length > 20; }}).length""")


def _stroke_colors(page, elem_id: str) -> set[str]:
    """The distinct colours of a Vega chart's stroked lines: one per series drawn."""
    return set(page.evaluate(f"""Array.from(document.querySelectorAll('#{elem_id} path')).filter(p => {{
        const s = p.getAttribute('stroke');
        return s && s !== 'transparent' && s !== 'none' && !p.classList.contains('background')
            && (p.getAttribute('d') || '').length > 20; }}).map(p => p.getAttribute('stroke'))"""))


def _plotted(page, elem_id: str) -> dict[str, list[tuple[float, float]]]:
    """The chart's data as drawn: Vega labels every point of the line plot's hover layer with its fields
    ("step: 1; loss: 2.5; series: a · train"); {series: [(step, y)]}."""
    labels = page.eval_on_selector_all(f"#{elem_id} svg [aria-roledescription=point]",
                                       "els => els.map(e => e.getAttribute('aria-label'))")
    out: dict[str, list[tuple[float, float]]] = {}
    for label in labels:
        fields = dict(part.split(": ", 1) for part in label.split("; "))
        y = next(v for k, v in fields.items() if k not in ("step", "series"))
        if y == "undefined":  # drawn while the y column changes (the log toggle): not there yet
            continue
        out.setdefault(fields["series"], []).append((float(fields["step"]), float(y)))
    return {k: sorted(v) for k, v in out.items()}


def _wait_plotted(page, elem_id: str, ok, timeout: float = 30):
    deadline, seen = time.time() + timeout, {}
    while time.time() < deadline:
        seen = _plotted(page, elem_id)
        if ok(seen):
            return seen
        time.sleep(0.25)
    raise AssertionError(f"the chart never showed the expected data; last seen: {seen}")


def test_run_history_overlays_runs_with_smoothing_and_log_scale(browser, start_app, tiny_models, tmp_path):
    """Two finished runs (their folders written directly): both are listed in the history, their curves are
    overlaid on one chart, the smoothing slider plots TensorBoard's moving average (computed here), the log
    toggle plots log10 of it; and the options sit in their groups."""
    a, b = [3.0, 2.4, 2.7, 1.8, 2.0, 1.3], [2.5, 2.6, 1.9, 1.7, 1.2, 1.25]
    runs = tmp_path / "runs"
    write_run(runs, "run-a", a, {3: 2.2, 6: 1.6})
    write_run(runs, "run-b", b, base="tiny-llama", state="stopped")
    models = tiny_models["llama"].parent
    app = start_app("--model", "tiny-llama", "--models-dir", str(models), "--loras-dir", str(tmp_path / "loras"),
                    "--runs-dir", str(runs), "--user-dir", str(tmp_path / "user"))
    page = open_app(browser, app.url)
    tab(page, "Training")

    for group, field in [("quantization", "train-opt-quantization"), ("data", "train-data-path"),
                         ("lora", "train-lora-init_lora_weights"), ("optimisation", "train-opt-learning_rate")]:
        assert page.locator(f"#train-group-{group} #{field}").is_visible(), group
    assert "use_dora" in page.inner_text("#train-group-lora")
    assert "Optimisation" in page.inner_text("#train-group-optimisation")

    history = wait_text(lambda: page.inner_text("#train-history"), timeout=30,
                        key=lambda t: "both" if "run-a" in t and "run-b" in t else t)
    assert history == "both"
    assert "stopped" in page.inner_text("#train-history") and "1.25" in page.inner_text("#train-history")

    for name in ("run-a", "run-b"):  # the newest is picked already; pick the other one too
        box = page.locator("#train-compare label", has_text=name).locator("input")
        if not box.is_checked():
            box.check()
    want = {"run-a · train": a, "run-a · eval": [2.2, 1.6], "run-b · train": b}
    steps = {"run-a · train": range(1, 7), "run-a · eval": [3, 6], "run-b · train": range(1, 7)}

    def expect(transform):
        return {s: [(float(x), pytest.approx(y, rel=1e-9)) for x, y in zip(steps[s], transform(v))]
                for s, v in want.items()}

    raw = expect(lambda v: v)
    _wait_plotted(page, "train-history-chart", lambda seen: seen == raw)
    # the overlay, created empty at page build and given a second run later, draws each series in its own colour
    assert wait_text(lambda: str(len(_stroke_colors(page, "train-history-chart"))), "3", timeout=20) == "3"

    set_number(page, "train-smoothing", 0.6)
    smooth = expect(lambda v: tensorboard_smooth(v, 0.6))
    _wait_plotted(page, "train-history-chart", lambda seen: seen == smooth)

    page.locator("#train-log-scale input").check()
    logged = expect(lambda v: [math.log10(x) for x in tensorboard_smooth(v, 0.6)])
    _wait_plotted(page, "train-history-chart", lambda seen: seen == logged)
    for chart in ("train-history-chart", "train-chart"):  # the axis says so, and stays a number axis
        axis = wait_text(lambda c=chart: page.locator(f"#{c} svg [aria-label^='Y-axis']").first.get_attribute(
            "aria-label"), "log10 linear", timeout=20, key=lambda t: "log10 linear"
            if "log10(loss)" in t and "linear scale" in t else t)
        assert axis == "log10 linear", chart
    screenshot(page, "tab-training")


def test_bad_data_is_refused_before_a_run_starts(browser, start_app, tiny_models, tmp_path):
    """(issue 29, item 8) An empty file, or a record without the format's field, is named in the form when Start is
    clicked, and no run process or run folder is made (it used to start, fail 45 s later and leave a failed run)."""
    models = tiny_models["llama"].parent
    empty, broken = tmp_path / "empty.txt", tmp_path / "broken.jsonl"
    empty.write_text("\n  \n")
    broken.write_text('{"instruction": "Say hi", "output": "hi"}\n{"instruction": "no answer here"}\n')
    app = start_app("--model", "tiny-llama", "--models-dir", str(models), "--loras-dir", str(tmp_path / "loras"),
                    "--runs-dir", str(tmp_path / "runs"), "--user-dir", str(tmp_path / "user"))
    page = open_app(browser, app.url)
    tab(page, "Training")
    _fill(page, "train-output", "refused-run")
    _fill(page, "train-base", "tiny-llama")
    _fill(page, "train-data-path", empty)
    page.click("#train-start")
    notice = wait_text(lambda: page.inner_text("#train-notice"), timeout=30)
    assert "dataset.path" in notice and "empty.txt is empty" in notice, notice
    _fill(page, "train-data-path", broken)
    page.locator("#train-data-format input").first.fill("instruction")
    page.locator("#train-data-format input").first.press("Enter")
    page.click("#train-start")
    assert wait_text(lambda: page.inner_text("#train-notice"), "yes", timeout=30,
                     key=lambda t: "yes" if "record 2: missing field 'output'" in t else t) == "yes"
    assert not (tmp_path / "runs" / "refused-run").exists()


def test_stop_saves_at_the_end_of_the_step_and_says_so_only_then(browser, start_app, tiny_models, tmp_path):
    """(issue 29, item 3) Stop asks the run to save at the end of the step it is in and answers at once without
    claiming a checkpoint; the status line says "checkpoint saved" once the run has written it. Stop used to wait
    60 s, kill the run and say "checkpoint saved" anyway when a step took longer (any 7B run on a CPU); here a step
    of a few hundred accumulated micro-batches stands in for a long one."""
    models = tiny_models["llama"].parent
    text = tmp_path / "long.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 3000)
    runs = tmp_path / "runs"
    app = start_app("--model", "tiny-llama", "--models-dir", str(models), "--loras-dir", str(tmp_path / "loras"),
                    "--runs-dir", str(runs), "--user-dir", str(tmp_path / "user"))
    page = open_app(browser, app.url)
    tab(page, "Training")
    _fill(page, "train-output", "long-steps")
    _fill(page, "train-base", "tiny-llama")
    _fill(page, "train-data-path", text)
    _fill(page, "train-opt-max_steps", 3)
    _fill(page, "train-opt-cutoff_len", 64)
    page.click("text=more optimisation options")
    _fill(page, "train-opt-gradient_accumulation", 300)
    page.click("#train-start")
    assert "Started" in wait_text(lambda: page.inner_text("#train-notice"), timeout=30)
    wait_text(lambda: page.inner_text("#train-status"), "running", timeout=60,
              key=lambda t: "running" if "running" in t else t)
    started = time.time()
    page.click("#train-stop")
    notice = wait_text(lambda: page.inner_text("#train-notice"), "yes", timeout=10,
                       key=lambda t: "yes" if "Stopping" in t else t)
    assert notice == "yes", page.inner_text("#train-notice")
    assert time.time() - started < 10 and "checkpoint saved" not in page.inner_text("#train-notice")
    assert not list((runs / "long-steps").glob("checkpoints/checkpoint-*"))  # the step has not ended yet
    assert wait_text(lambda: page.inner_text("#train-status"), "saved", timeout=240,
                     key=lambda t: "saved" if "checkpoint saved" in t else t) == "saved"
    assert (runs / "long-steps" / "checkpoints" / "checkpoint-1").is_dir()
    assert "stopped" in page.inner_text("#train-status")


def test_an_uploaded_chat_file_sets_the_format_and_preview_needs_no_name(browser, start_app, tiny_models, tmp_path):
    """(issue 29, item 7) Uploading a chat .jsonl sets the format to chat (it stayed raw and the preview showed the
    JSON as text), and the preview works before an adapter name is typed (it asked for one)."""
    data = write_data(tmp_path / "data")
    models = tiny_models["llama"].parent
    app = start_app("--model", "tiny-llama", "--models-dir", str(models), "--loras-dir", str(tmp_path / "loras"),
                    "--runs-dir", str(tmp_path / "runs"), "--user-dir", str(tmp_path / "user"))
    page = open_app(browser, app.url)
    tab(page, "Training")
    _fill(page, "train-base", "tiny-llama")
    assert page.input_value("#train-data-format input") == "raw"
    page.locator("#train-upload input[type=file]").set_input_files(str(data["chat"]))
    assert wait_text(lambda: page.input_value("#train-data-format input"), "chat", timeout=30) == "chat"
    assert page.input_value("#train-data-path textarea, #train-data-path input").endswith("chat.jsonl")
    _fill(page, "train-opt-cutoff_len", 64)
    page.click("#train-preview-go")
    shown = wait_text(lambda: page.input_value("#train-preview textarea"), timeout=60)
    assert "samples" in shown and "⟦" in shown and "output" not in shown.split("\n")[0], shown[:200]
    _fill(page, "train-data-path", data["instruction"])  # a typed path is read too
    assert wait_text(lambda: page.input_value("#train-data-format input"), "instruction", timeout=30) == "instruction"


def test_the_form_survives_a_reload_and_a_past_run_fills_it(browser, start_app, tiny_models, tmp_path):
    """(issue 29, item 6) The Training form is kept in this browser across a reload (it came back empty), and the
    run history loads a past run's settings into the form (a stopped run was resumed by retyping everything)."""
    data = write_data(tmp_path / "data")
    runs = tmp_path / "runs"
    past = write_run(runs, "older-run", [2.0, 1.5])
    (past / "config.yaml").write_text(f"output: older-run\nbase_model: tiny-llama\ndataset:\n  path: {data['chat']}\n"
                                      "  format: chat\ntraining:\n  max_steps: 33\n  learning_rate: 0.002\n")
    models = tiny_models["llama"].parent
    app = start_app("--model", "tiny-llama", "--models-dir", str(models), "--loras-dir", str(tmp_path / "loras"),
                    "--runs-dir", str(runs), "--user-dir", str(tmp_path / "user"))
    page = open_app(browser, app.url)
    tab(page, "Training")
    _fill(page, "train-output", "kept-name")
    _fill(page, "train-data-path", data["raw"])
    _fill(page, "train-opt-max_steps", 77)
    page.wait_for_timeout(1500)  # the last edit reaches the browser's storage
    page.reload()
    page.wait_for_selector("#chat-input textarea", timeout=60_000)
    tab(page, "Training")
    box = page.locator("#train-output textarea, #train-output input").first
    assert wait_text(lambda: box.input_value(), "kept-name", timeout=30) == "kept-name"
    assert page.locator("#train-opt-max_steps input[type=number]").first.input_value() == "77"
    assert page.input_value("#train-data-path textarea, #train-data-path input") == str(data["raw"])

    page.locator("#train-compare label", has_text="older-run").first.wait_for(timeout=30_000)
    if not page.locator("#train-compare label", has_text="older-run").locator("input").first.is_checked():
        page.locator("#train-compare label", has_text="older-run").first.click()
    page.click("#train-history-load")
    assert "older-run" in wait_text(lambda: page.inner_text("#train-notice"), timeout=30)
    assert wait_text(lambda: box.input_value(), "older-run", timeout=30) == "older-run"
    assert page.locator("#train-opt-max_steps input[type=number]").first.input_value() == "33"
    assert page.input_value("#train-data-format input") == "chat"
