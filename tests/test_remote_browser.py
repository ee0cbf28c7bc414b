"""The remote loader from the Model tab, in headless Chromium: a LoRA Deck started on another tiny model loads a
second LoRA Deck (`--nowebui`, the engine) by typing its URL in the model box and picking the remote loader;
the status shows the engine's base, its context and which of our adapters it serves; the chat then answers
with the engine's reply (base, and adapter A picked in the LoRA panel), equal to the same chat sent straight
to the engine's API."""
import shutil

import httpx
import pytest

from tests.browser import bot_text, greedy, open_app, screenshot, send, tab, wait_text, words
from tests.helpers import api_app

MAX_NEW = 12
QUESTION = "Name three colors."


def direct(url: str, model: str) -> str:
    body = {"messages": [{"role": "user", "content": QUESTION}], "temperature": 0, "max_tokens": MAX_NEW,
            "model": model}
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


@pytest.fixture(scope="module")
def engine(tiny_models, llama_loras, tmp_path_factory):
    loras = tmp_path_factory.mktemp("remote-ui-loras")
    for name in ("A", "B"):
        shutil.copytree(llama_loras / name, loras / name)
    proc = api_app(tiny_models["llama"], loras)  # the engine: another LoRA Deck, API only
    yield proc, loras
    proc.stop()


def test_remote_engine_from_the_model_tab(browser, start_app, tiny_models, engine):
    back, loras = engine
    refs = {"base": direct(back.url, "tiny-llama"), "A": direct(back.url, "A")}
    # what the front would say on its own model: the chat must change to the engine's answer
    local = tiny_models["qwen2"]
    front = start_app("--model", local.name, "--models-dir", str(local.parent), "--loras-dir", str(loras))
    own = direct(front.url, local.name)
    assert len({words(t) for t in (refs["base"], refs["A"], own)}) == 3, (refs, own)

    page = open_app(browser, front.url)
    greedy(page, MAX_NEW)
    tab(page, "Model")
    pick = page.locator("#model-select input").first
    pick.fill(back.url)
    pick.press("Enter")
    loader = page.locator("#model-loader input").first
    loader.fill("remote")
    loader.press("Enter")
    assert page.locator("#setting-remote_api_key input[type=password]").count() == 1  # the key is never shown
    page.click("#model-load")
    page.wait_for_function("document.querySelector('#model-status').innerText.includes('remote')", timeout=90_000)
    status = page.inner_text("#model-status")
    assert "tiny-llama" in status and "loradeck" in status and "context 256 tokens" in status, status
    assert "serves: A, B" in status, status
    screenshot(page, "tab-model-remote")

    tab(page, "Chat")
    send(page, QUESTION)
    assert wait_text(bot_text(page, 0), refs["base"], key=words) == words(refs["base"])

    # adapter A, one click in the LoRA panel: the engine answers with A
    tab(page, "Model")
    page.locator("#lora-on-A input[type=checkbox]").check()
    assert wait_text(lambda: page.inner_text("#lora-message"), "Active: A × 1", timeout=60) == "Active: A × 1"
    tab(page, "Chat")
    page.click("#chat-regenerate")
    assert wait_text(bot_text(page, 0), refs["A"], key=words) == words(refs["A"])
