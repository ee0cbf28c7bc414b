"""The real app in headless Chromium: the four tabs are there; a chat streams the embedded model's reply
(greedy, set on the Parameters tab) equal to plain transformers; two browser tabs keep their own
histories; a broken model picked on the Model tab shows the reason and the chat keeps answering."""
import re
import shutil
import time

import pytest

from tests.conftest import ROOT

ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]
QUESTION = "What is the capital of France?"
MAX_NEW = 20


def norm(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def chat_reference(folder, question: str) -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    prompt = tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                     add_generation_prompt=True)
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**ids, do_sample=False, max_new_tokens=MAX_NEW)
    return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


@pytest.fixture(scope="module")
def browser():
    pw = pytest.importorskip("playwright.sync_api")
    with pw.sync_playwright() as p:
        b = p.chromium.launch(executable_path="/usr/bin/chromium", args=ARGS)
        yield b
        b.close()


def set_number(page, elem_id: str, value) -> None:
    box = page.locator(f"#{elem_id} input[type=number]").first
    box.fill(str(value))
    box.press("Enter")


def go_greedy(page) -> None:
    page.get_by_role("tab", name="Parameters").click()
    set_number(page, "param-temperature", 0)
    set_number(page, "param-max_new_tokens", MAX_NEW)
    page.get_by_role("tab", name="Chat").click()


def send(page, text: str) -> None:
    page.fill("#chat-input textarea", text)
    page.locator("#chat-input textarea").press("Enter")


def wait_bot(page, index: int, expected: str | None = None, timeout: float = 90) -> str:
    """The text of the index-th bot message once it stops changing (or equals `expected`)."""
    deadline, last, stable = time.time() + timeout, None, 0
    while time.time() < deadline:
        bots = page.locator("#chatbot [data-testid=bot]")
        if bots.count() > index:
            text = norm(bots.nth(index).inner_text())
            if expected is not None and text == norm(expected):
                return text
            stable = stable + 1 if text == last and text else 0
            if expected is None and stable >= 6:
                return text
            last = text
        time.sleep(0.25)
    return last or ""


def test_chat_in_the_browser(browser, start_app, embedded_folder, tiny_models, tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    (models / embedded_folder.name).symlink_to(embedded_folder, target_is_directory=True)
    shutil.copytree(tiny_models["llama"], models / "broken")
    (models / "broken" / "config.json").unlink()
    app = start_app("--models-dir", str(models), "--loader", "transformers", "--presets-dir", str(ROOT / "presets"))
    expected = chat_reference(embedded_folder, QUESTION)

    page = browser.new_context().new_page()
    page.goto(app.url)
    page.wait_for_selector("#chat-input textarea", timeout=60_000)
    assert [t.inner_text().strip() for t in page.get_by_role("tab").all()] == ["Chat", "Parameters", "Model", "Training"]
    assert "SmolLM2-135M-Instruct" in page.inner_text("#chat-status")

    go_greedy(page)
    send(page, QUESTION)
    assert wait_bot(page, 0, expected) == norm(expected)

    # a second user in another browser has an empty chat of their own
    other = browser.new_context().new_page()
    other.goto(app.url)
    other.wait_for_selector("#chat-input textarea", timeout=60_000)
    assert other.locator("#chatbot [data-testid=user]").count() == 0
    go_greedy(other)
    send(other, "Say hello.")
    assert wait_bot(other, 0)
    assert QUESTION not in other.inner_text("#chatbot")
    assert page.locator("#chatbot [data-testid=bot]").count() == 1

    # a broken model is refused with its reason, and the chat keeps answering with the same model
    page.get_by_role("tab", name="Model").click()
    pick = page.locator("#model-select input").first
    pick.fill("broken")
    pick.press("Enter")
    page.click("#model-load")
    page.wait_for_function("document.querySelector('#model-status').innerText.includes('Load failed')",
                           timeout=60_000)
    assert "config.json is missing" in page.inner_text("#model-status")
    assert "Loaded SmolLM2-135M-Instruct" in page.inner_text("#model-status")
    page.get_by_role("tab", name="Chat").click()
    page.click("#chat-regenerate")
    time.sleep(1)
    assert wait_bot(page, 0, expected) == norm(expected)
