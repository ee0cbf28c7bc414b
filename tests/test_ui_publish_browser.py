"""Publishing from the LoRA panel in a real browser: name an adapter and a hub repo, press Publish, and the
repo on a local hub (webui.testing.fake_hub) holds the adapter's files with the model card written first;
a destination that is neither hf: nor s3:// is refused in the panel with nothing sent."""
import json

from tests.browser import open_app, tab, wait_text
from webui.testing.fake_hub import FakeHub
from webui.testing.tiny_models import write_adapter


def test_publish_from_the_lora_panel(browser, start_app, tiny_models, tmp_path):
    loras = tmp_path / "loras"
    lora = write_adapter(tiny_models["llama"], loras / "panel-lora", target_modules=["q_proj"], r=2)
    hub = FakeHub()
    try:
        app = start_app("--model", "tiny-llama", "--models-dir", str(tiny_models["llama"].parent),
                        "--loras-dir", str(loras), "--runs-dir", str(tmp_path / "runs"),
                        "--user-dir", str(tmp_path / "user"),
                        env={"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_TOKEN": hub.token})
        page = open_app(browser, app.url)
        tab(page, "Model")
        page.get_by_text("Publish an adapter (Hugging Face hub, S3)").click()
        page.locator("#publish-name textarea, #publish-name input").first.fill("panel-lora")
        page.locator("#publish-to textarea, #publish-to input").first.fill("me/panel-lora")
        page.click("#publish-go")
        assert "hf:ORG/NAME" in wait_text(lambda: page.inner_text("#publish-message"), timeout=30)
        assert not [e for e in hub.log if e[0] == "POST"]  # nothing sent (Gradio itself GETs a few hub routes)

        page.locator("#publish-to textarea, #publish-to input").first.fill("hf:me/panel-lora")
        page.click("#publish-go")
        message = wait_text(lambda: page.inner_text("#publish-message"), timeout=60,
                            key=lambda t: t if "Published" in t or "Publish failed" in t else "")
        assert "Published" in message and f"{hub.url}/me/panel-lora" in message, message
        published = hub.repos["me/panel-lora"]["main"]
        local = {p.name: p.read_bytes() for p in lora.iterdir() if p.is_file()}
        assert published == local  # the card (README.md) was written into the folder first, then sent with it
        assert "library_name: peft" in local["README.md"].decode()
        assert json.loads(published["adapter_config.json"])["r"] == 2
    finally:
        hub.stop()
