"""Issue 29, item 5, in Chromium: on the default loader (llama.cpp, the embedded model) the LoRA panel's Blend
makes the exact `cat` blend (it used to be refused with a pointer to the CLI), Merge says what works instead (the
Export panel, or the transformers loader), and switching the same model to the transformers loader keeps the
active adapters (they used to be dropped silently), after which Merge works."""
from tests.browser import open_app, tab, wait_text
from webui.testing.tiny_models import write_adapter


def test_blend_merge_and_a_loader_switch_on_the_default_loader(browser, start_app, embedded_folder, tmp_path):
    models, loras = tmp_path / "models", tmp_path / "loras"
    models.mkdir()
    (models / embedded_folder.name).symlink_to(embedded_folder, target_is_directory=True)  # converted once
    write_adapter(embedded_folder, loras / "A", target_modules=["q_proj", "v_proj"], r=4, seed=21)
    app = start_app("--models-dir", str(models), "--loras-dir", str(loras), "--user-dir", str(tmp_path / "user"))
    page = open_app(browser, app.url)
    tab(page, "Model")
    assert "llamacpp" in page.inner_text("#model-status")
    page.locator("#lora-on-A input[type=checkbox]").check()
    assert wait_text(lambda: page.inner_text("#lora-message"), "Active: A × 1", timeout=90) == "Active: A × 1"

    page.get_by_text("Blend active adapters into a new adapter").click()
    page.locator("#blend-name input, #blend-name textarea").first.fill("A-blend")
    page.click("#blend-go")
    saved = wait_text(lambda: page.inner_text("#blend-message"), timeout=90,
                      key=lambda t: "saved" if "A-blend" in t else t)
    assert saved == "saved" and (loras / "A-blend" / "adapter_model.safetensors").is_file()

    page.click("#lora-merge")
    refused = wait_text(lambda: page.inner_text("#lora-message"), timeout=30,
                        key=lambda t: "named" if "Export" in t and "transformers loader" in t else t)
    assert refused == "named"

    loader = page.locator("#model-loader input").first
    loader.fill("transformers")
    loader.press("Enter")
    page.click("#model-load")
    page.wait_for_function("document.querySelector('#model-status').innerText.includes('Adapters kept')",
                           timeout=180_000)
    assert "Adapters kept: A × 1" in page.inner_text("#model-status")
    page.click("#lora-merge")
    merged = wait_text(lambda: page.inner_text("#lora-message"), timeout=60,
                       key=lambda t: "merged" if "erged" in t and "Export" not in t else t)
    assert merged == "merged", page.inner_text("#lora-message")
    page.context.close()
