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
