"""Small things a first visit meets, in a real browser: saving a preset says it was saved (the name put back in
the preset box does not load it again and answer "Loaded preset"), picking a preset loads its values, and the
Export panel's name field says where a GGUF LoRA goes (the loras folder, not the models folder)."""
import shutil

import yaml

from tests.browser import open_app, set_number, tab, wait_text
from tests.helpers import ROOT


def test_preset_save_and_load_and_the_export_name_label(browser, start_app, tiny_models, tmp_path):
    presets = tmp_path / "presets"
    shutil.copytree(ROOT / "presets", presets)
    app = start_app("--model", "tiny-llama", "--models-dir", str(tiny_models["llama"].parent),
                    "--loras-dir", str(tmp_path / "loras"), "--presets-dir", str(presets),
                    "--user-dir", str(tmp_path / "user"))
    page = open_app(browser, app.url)
    tab(page, "Parameters")
    set_number(page, "param-max_new_tokens", 77)
    page.locator("#preset-name textarea, #preset-name input").first.fill("mine")
    page.click("#preset-save")
    notice = wait_text(lambda: page.inner_text("#preset-notice"), timeout=30)
    assert notice.startswith("Saved mine.yaml"), notice
    page.wait_for_timeout(1500)  # a stray load would replace the notice now
    assert page.inner_text("#preset-notice").startswith("Saved mine.yaml")
    assert yaml.safe_load((presets / "mine.yaml").read_text())["max_new_tokens"] == 77

    page.locator("#preset input").first.click()
    page.get_by_role("option", name="Greedy", exact=True).click()
    assert wait_text(lambda: page.inner_text("#preset-notice"), timeout=30).startswith("Loaded preset Greedy")
    want = yaml.safe_load((presets / "Greedy.yaml").read_text())
    shown = page.locator("#param-temperature input[type=number]").first.input_value()
    assert float(shown) == float(want.get("temperature", 0)), (shown, want)

    tab(page, "Model")
    page.get_by_text("Export merged model, or the adapters for llama.cpp / Ollama").click()
    page.get_by_label("output name (in the models folder)").wait_for(timeout=15_000)
    page.locator("#export-format input").first.click()
    page.get_by_role("option", name="gguf-lora", exact=True).click()
    page.get_by_label("output name (in the loras folder)").wait_for(timeout=15_000)


def test_an_out_of_range_number_is_named_and_fixed_in_the_form(browser, start_app, tiny_models, tmp_path):
    """(issue 29, item 8) max_new_tokens 1,000,000 used to be accepted by the field and refused only on Send, with
    an error that named neither the field nor the range; leaving the field now brings it to the most it may be,
    with a warning that names it, and Send answers."""
    app = start_app("--model", "tiny-llama", "--models-dir", str(tiny_models["llama"].parent),
                    "--loras-dir", str(tmp_path / "loras"), "--user-dir", str(tmp_path / "user"))
    page = open_app(browser, app.url)
    tab(page, "Parameters")
    set_number(page, "param-temperature", 0)
    box = page.locator("#param-max_new_tokens input[type=number]").first
    box.fill("1000000")
    box.press("Tab")  # leaving the field
    assert wait_text(lambda: box.input_value(), "8192", timeout=15) == "8192"
    toast = wait_text(lambda: page.locator(".toast-body").first.inner_text() if page.locator(".toast-body").count()
                      else "", timeout=15)
    assert "max_new_tokens" in toast and "at most 8192" in toast, toast
    set_number(page, "param-max_new_tokens", 4)
    tab(page, "Chat")
    page.locator("#chat-input textarea").fill("Hello")
    page.locator("#chat-input textarea").press("Enter")
    page.wait_for_function("document.querySelectorAll('#chatbot [data-testid=bot]').length > 0", timeout=60_000)
    assert page.locator(".toast-body", has_text="Error").count() == 0
