"""The Training tab while a run trains (issue 30), in Chromium: the page follows the running run, names its
newest checkpoint, answers a prompt with it beside the base (the base's card equal to the API's answer from the
base, sent with the same settings), and one click makes it the Chat tab's adapter and opens the Chat tab; the
Model tab's LoRA panel lists it, ticked."""
import html
import time

import openai

from tests.browser import open_app, screenshot, tab, wait_text
from tests.helpers import write_data
from webui.options.training import TrainConfig
from webui.training.run_folder import checkpoints
from webui.training.runner import TrainingRunner
from webui.ui.training.live import TRY_PARAMS

QUESTION = "Tell me about the sea."


def test_try_the_newest_checkpoint_while_the_run_trains(browser, start_app, tiny_models, tmp_path):
    models, loras, runs = tiny_models["llama"].parent, tmp_path / "loras", tmp_path / "runs"
    app = start_app("--model", "tiny-llama", "--models-dir", str(models), "--loras-dir", str(loras),
                    "--runs-dir", str(runs), "--user-dir", str(tmp_path / "user"))
    runner = TrainingRunner(runs, models, loras)
    runner.start(TrainConfig.from_dict({
        "base_model": "tiny-llama", "output": "watched",
        "dataset": {"path": str(write_data(tmp_path / "data")["raw"]), "format": "raw"},
        "lora": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": "all-linear"},
        # long enough to be still training when the page asks; the test kills it at the end
        "training": {"max_steps": 100000, "learning_rate": 0.01, "batch_size": 2, "save_steps": 40,
                     "cutoff_len": 32, "seed": 7}}))
    try:
        deadline = time.time() + 120
        while not checkpoints(runs / "watched") and time.time() < deadline:
            time.sleep(0.2)
        page = open_app(browser, app.url)
        tab(page, "Training")
        line = wait_text(lambda: page.inner_text("#train-live-status"), timeout=30,
                         key=lambda t: "named" if "watched@latest" in t and "fits" in t else t)
        assert line == "named", page.inner_text("#train-live-status")

        page.locator("#train-live-prompt textarea").fill(QUESTION)
        page.click("#train-live-compare")
        cards = page.locator("#train-live-result .compare-card")
        assert wait_text(lambda: str(cards.count()), "2", timeout=30) == "2"
        assert [cards.nth(i).get_attribute("data-name") for i in range(2)] == ["base", "watched@latest"]
        wait_text(lambda: "…" if page.locator("#train-live-result em").count() else "both", "both", timeout=120)
        texts = [cards.nth(i).locator("pre").inner_text() for i in range(2)]
        client = openai.OpenAI(base_url=app.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        base = client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": QUESTION}],
                                              max_tokens=TRY_PARAMS.max_new_tokens, temperature=0)
        assert texts[0] == html.unescape(base.choices[0].message.content)
        assert texts[1] and texts[1] != texts[0]
        screenshot(page, "training-live", "#train-live")

        page.click("#train-live-chat")
        assert "Chat tab answers with" in wait_text(lambda: page.inner_text("#train-notice"), timeout=30)
        assert page.locator("#chat-status").is_visible()  # the Chat tab is open
        status = wait_text(lambda: page.inner_text("#chat-status"), "watched@latest × 1", timeout=20,
                           key=lambda t: "watched@latest × 1" if "watched@latest × 1" in t else t)
        assert status == "watched@latest × 1"
        tab(page, "Model")  # the LoRA panel lists the live checkpoints too, this one ticked, with its badge
        box = page.locator("#lora-on-watched-latest input[type=checkbox]")
        assert wait_text(lambda: str(box.count() and box.is_checked()), "True", timeout=30) == "True"
        assert "ok" in page.inner_text("#lora-badge-watched-latest")
        page.context.close()
    finally:
        runner.kill("watched")
