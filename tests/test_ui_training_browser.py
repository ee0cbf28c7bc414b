"""Training from the browser: fill the Training tab's short form, start a run, watch the progress and the
loss chart update, and apply the finished adapter to the chat with one click (no base reload)."""
from tests.browser import open_app, screenshot, tab, wait_text
from tests.helpers import write_data


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
    assert "No training run yet" in page.inner_text("#train-status")
