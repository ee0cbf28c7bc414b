"""The real app in headless Chromium: the five tabs are there; a chat streams the embedded model's reply
(greedy, set on the Parameters tab) equal to plain transformers; two browser tabs keep their own
histories; picking a model shows the memory its load needs; a broken model picked on the Model tab shows the
reason and the chat keeps answering."""
import shutil
import time

from tests.browser import bot_text, greedy, norm, open_app, send, tab, wait_text
from tests.helpers import ROOT, chat_reference
from webui.backends import machine

QUESTION = "What is the capital of France?"
MAX_NEW = 20


def wait_bot(page, index: int, expected: str | None = None) -> str:
    return wait_text(bot_text(page, index), expected)


def test_chat_in_the_browser(browser, start_app, embedded_folder, tiny_models, tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    (models / embedded_folder.name).symlink_to(embedded_folder, target_is_directory=True)
    shutil.copytree(tiny_models["llama"], models / "broken")
    (models / "broken" / "config.json").unlink()
    app = start_app("--models-dir", str(models), "--loader", "transformers", "--presets-dir", str(ROOT / "presets"))
    expected = chat_reference(embedded_folder, QUESTION, MAX_NEW)

    page = open_app(browser, app.url)
    tabs = [t.inner_text().strip() for t in page.get_by_role("tab").all()]
    assert tabs == ["Chat", "Parameters", "Model", "Training", "Evaluate"]
    assert "SmolLM2-135M-Instruct" in wait_text(lambda: page.inner_text("#chat-status"), timeout=20)

    greedy(page, MAX_NEW)
    send(page, QUESTION)
    assert wait_bot(page, 0, expected) == norm(expected)

    # a second user in another browser has an empty chat of their own
    other = open_app(browser, app.url)
    assert other.locator("#chatbot [data-testid=user]").count() == 0
    greedy(other, MAX_NEW)
    send(other, "Say hello.")
    assert wait_bot(other, 0)
    assert QUESTION not in other.inner_text("#chatbot")
    assert page.locator("#chatbot [data-testid=bot]").count() == 1

    # a broken model is refused with its reason, and the chat keeps answering with the same model
    tab(page, "Model")
    pick = page.locator("#model-select input").first
    # picking a model shows the memory its load needs (float32 here, from the headers) before anything loads
    pick.click()
    page.get_by_role("option", name=embedded_folder.name, exact=True).click()
    page.wait_for_function("document.querySelector('#model-fit').innerText.includes('loading needs about')",
                           timeout=20_000)
    need = machine.gb(machine.load_need(embedded_folder, 4))
    assert f"loading needs about {need}" in page.inner_text("#model-fit") and "it fits" in page.inner_text("#model-fit")
    pick.fill("broken")
    pick.press("Enter")
    page.click("#model-load")
    page.wait_for_function("document.querySelector('#model-status').innerText.includes('Load failed')",
                           timeout=60_000)
    assert "config.json is missing" in page.inner_text("#model-status")
    assert "Loaded SmolLM2-135M-Instruct" in page.inner_text("#model-status")
    tab(page, "Chat")
    page.click("#chat-regenerate")
    time.sleep(1)
    assert wait_bot(page, 0, expected) == norm(expected)
