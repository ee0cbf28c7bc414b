"""The Model tab's status line in the real app, in headless Chromium (issue 29, item 4): it names the model and
loader the server holds after a page reload (it was the one built at start-up), and it follows the LoRA panel's
adapters within a few seconds (it said "adapters: none" while the panel said "Active: A × 1")."""
import httpx

from tests.browser import open_app, tab, wait_text


def _status_has(page, text: str, timeout: float = 30) -> bool:
    return wait_text(lambda: page.inner_text("#model-status"), "yes", timeout=timeout,
                     key=lambda t: "yes" if text in t else t) == "yes"


def test_the_status_line_follows_the_server(browser, start_app, gguf_models, llama_loras, tmp_path):
    app = start_app("--model", "tiny-llama.gguf", "--loader", "llamacpp", "--models-dir", str(gguf_models),
                    "--loras-dir", str(llama_loras), "--user-dir", str(tmp_path / "user"))
    page = open_app(browser, app.url)
    tab(page, "Model")
    assert _status_has(page, "Loaded tiny-llama.gguf on llamacpp"), page.inner_text("#model-status")
    page.locator("#model-select input").first.click()
    page.get_by_role("option", name="tiny-llama", exact=True).click()
    page.click("#model-load")
    assert _status_has(page, "Loaded in", timeout=120)
    assert "Loaded tiny-llama on transformers" in page.inner_text("#model-status")
    assert httpx.get(app.url + "/health").json()["loader"] == "transformers"

    page.reload()
    page.wait_for_selector("#chat-input textarea", timeout=60_000)
    tab(page, "Model")
    assert _status_has(page, "Loaded tiny-llama on transformers"), page.inner_text("#model-status")
    assert "llamacpp" not in page.inner_text("#model-status")

    page.locator("#lora-on-A input[type=checkbox]").check()
    assert wait_text(lambda: page.inner_text("#lora-message"), "Active: A × 1", timeout=60) == "Active: A × 1"
    assert _status_has(page, "adapters: A × 1", timeout=15), page.inner_text("#model-status")
    page.context.close()
