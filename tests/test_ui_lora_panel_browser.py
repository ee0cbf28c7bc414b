"""Issue 29, items 9 and 10, in Chromium against the real app (a tiny Llama on the transformers loader): one box
for base models and one for adapters, which takes a hub id, a path or an upload (a .zip or the adapter's files,
checked, refused when unsafe); a missing path named as such and no lock file left in the loras folder; each panel
message under the button that caused it and cleared by the next action; the count line says what was checked
without "all checked" beside unticked rows; a readable list at 390 px; with loader auto, only the settings of the
loader auto picks for the chosen model. Each check reads the page against the files on disk or the registry."""
from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from tests.browser import open_app, screenshot, tab, wait_text
from tests.helpers import AppProcess
from webui.adapters.files import list_adapters
from webui.backends import registry
from webui.testing.tiny_models import write_adapter

PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")


@pytest.fixture(scope="module")
def world(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("ui-lora-panel")
    models, loras = root / "models", root / "loras"
    models.mkdir()
    (models / "tiny-llama").symlink_to(tiny_models["llama"], target_is_directory=True)
    write_adapter(tiny_models["llama"], loras / "A", target_modules=["q_proj", "v_proj"], r=4, seed=1)
    src = write_adapter(tiny_models["llama"], root / "elsewhere" / "style", target_modules=["o_proj"], r=4, seed=2)
    app = AppProcess("--model", "tiny-llama", "--loader", "transformers", "--models-dir", str(models),
                     "--loras-dir", str(loras), "--user-dir", str(root / "user"), env={"HF_HUB_OFFLINE": "1"})
    try:
        yield app.wait_ready(), root, loras, src
    finally:
        app.stop()


def _fill(page, elem_id: str, value) -> None:
    page.locator(f"#{elem_id} textarea, #{elem_id} input").first.fill(str(value))


def _pick(page, elem_id: str, option: str) -> None:
    page.locator(f"#{elem_id} input").first.click()
    page.get_by_role("option", name=option, exact=True).click()


def _text(page, selector: str) -> str:
    return page.inner_text(selector) if page.locator(selector).count() else ""


def _upload(page, files: list[Path]) -> None:
    """Put `files` in the upload box (replacing what was there) and wait until the page holds them."""
    clear = page.locator("#lora-upload button[aria-label='Clear']")
    if clear.count():
        clear.first.click()
    page.set_input_files("#lora-upload input[type=file]", [str(f) for f in files])
    for f in files:
        page.locator("#lora-upload", has_text=f.stem).wait_for(timeout=30_000)  # (shown as stem, then suffix)


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def _files(folder: Path) -> dict[str, bytes]:
    return {n: (folder / n).read_bytes() for n in PEFT_FILES}


def test_one_place_for_adapters_a_missing_path_and_messages_next_to_their_buttons(browser, world):
    """Items 9 (a, c) and 10 (a, b)."""
    app, root, loras, src = world
    page = open_app(browser, app.url)
    tab(page, "Model")
    page.locator("#lora-on-A").wait_for(timeout=30_000)
    # one box downloads base models, one gets adapters (the old page had both taking adapters)
    assert page.get_by_text("Download a base model (hub, S3)").count() == 1
    assert page.get_by_text("Download a model or adapter").count() == 0
    # the count line names the compatibility checks, never "all checked" beside rows nobody ticked
    count = wait_text(lambda: page.inner_text("#lora-count"), timeout=60,
                      key=lambda t: "done" if "compatibility checked" in t else t)
    assert count == "done" and "all checked" not in page.inner_text("#lora-panel")
    assert not page.locator("#lora-on-A input[type=checkbox]").is_checked()

    page.get_by_text("Get an adapter: hub, a folder on this machine, S3, or upload").click()
    _fill(page, "lora-source-id", "/no/such/dir")
    page.click("#lora-fetch")
    message = wait_text(lambda: _text(page, "#lora-get-message"), timeout=30)
    assert "/no/such/dir: no such folder" in message and "hub repository" not in message, message
    # the message sits right under the Get area's buttons, and the panel's other message stays empty
    button, box = page.locator("#lora-fetch").bounding_box(), page.locator("#lora-get-message").bounding_box()
    assert 0 <= box["y"] - (button["y"] + button["height"]) < 400, (button, box)
    assert _text(page, "#lora-message").strip() == ""

    # a hub fetch that fails (no network here) leaves no lock file among the adapters (hidden folders hold them)
    _fill(page, "lora-source-id", "org/missing-adapter")
    page.click("#lora-fetch")
    message = wait_text(lambda: _text(page, "#lora-get-message"), timeout=60,
                        key=lambda t: t if "missing-adapter" in t or "offline" in t.lower() else "")
    assert message.startswith("⚠️"), message
    assert sorted(p.name for p in loras.iterdir() if not p.name.startswith(".")) == ["A"]
    assert not [p for p in loras.rglob("*.lock") if not p.relative_to(loras).parts[0].startswith(".")]

    # a folder on this machine, by its path: copied in, listed, its message under the Get button
    _fill(page, "lora-source-id", str(src))
    page.click("#lora-fetch")
    got = wait_text(lambda: _text(page, "#lora-get-message"), timeout=60, key=lambda t: "got" if "Got" in t else t)
    assert got == "got" and _files(loras / "style") == _files(src)
    page.locator("#lora-on-style").wait_for(timeout=30_000)

    # the next action (a tick) answers in the list's message and clears the Get area's
    page.locator("#lora-on-A input[type=checkbox]").check()
    assert wait_text(lambda: page.inner_text("#lora-message"), "Active: A × 1", timeout=60) == "Active: A × 1"
    assert wait_text(lambda: _text(page, "#lora-get-message"), "", timeout=10) == ""
    # and a button elsewhere clears the list's message in turn, answering under its own button
    page.get_by_text("Export merged model, or the adapters for llama.cpp / Ollama").click()
    page.click("#export-go")
    refused = wait_text(lambda: _text(page, "#export-message"), timeout=30)
    assert "plain name" in refused
    assert wait_text(lambda: _text(page, "#lora-message"), "", timeout=10) == ""
    page.locator("#lora-on-A input[type=checkbox]").uncheck()
    assert wait_text(lambda: page.inner_text("#lora-message"), timeout=30).startswith("Active: none")
    assert wait_text(lambda: _text(page, "#export-message"), "", timeout=10) == ""
    page.context.close()


def test_upload_an_adapter_zip_or_its_files(browser, world, tmp_path):
    """Item 9 (b): a .zip of an adapter folder lands in the loras folder under the folder's name and is listed;
    loose files take the typed name; a zip-slip zip, a zip that is not a LoRA and pickled weights are refused with
    the reason, and nothing of theirs reaches the loras folder."""
    app, root, loras, src = world
    page = open_app(browser, app.url)
    tab(page, "Model")
    page.get_by_text("Get an adapter: hub, a folder on this machine, S3, or upload").click()

    _upload(page, [_zip(tmp_path / "download.zip", {f"pirate/{n}": b for n, b in _files(src).items()})])
    page.click("#lora-upload-go")
    added = wait_text(lambda: _text(page, "#lora-get-message"), timeout=60, key=lambda t: "added" if "Added" in t else t)
    assert added == "added" and _files(loras / "pirate") == _files(src)
    page.locator("#lora-on-pirate").wait_for(timeout=30_000)
    page.locator("#lora-on-pirate input[type=checkbox]").check()  # it works: applied on the loaded model
    assert wait_text(lambda: page.inner_text("#lora-message"), "Active: pirate × 1", timeout=60) == "Active: pirate × 1"

    _upload(page, [src / n for n in PEFT_FILES])
    _fill(page, "lora-upload-name", "loose")
    page.click("#lora-upload-go")
    added = wait_text(lambda: _text(page, "#lora-get-message"), timeout=60, key=lambda t: "added" if "Added" in t else t)
    assert added == "added" and _files(loras / "loose") == _files(src)
    assert wait_text(lambda: _text(page, "#lora-message"), "", timeout=10) == ""  # cleared by the upload
    _fill(page, "lora-upload-name", "")

    before = sorted(list_adapters(loras))
    bad = {
        "outside": _zip(tmp_path / "slip.zip", {**{f"x/{n}": b for n, b in _files(src).items()},
                                                "../../evil.txt": b"owned"}),
        "no adapter_config.json": _zip(tmp_path / "model.zip", {"config.json": b"{}", "model.safetensors": b"x"}),
        "Python pickle": _zip(tmp_path / "pickled.zip", {"adapter_config.json": _files(src)["adapter_config.json"],
                                                         "adapter_model.bin": b"\x80\x04K\x01."}),
    }
    for reason, archive in bad.items():
        _upload(page, [archive])
        page.click("#lora-upload-go")
        message = wait_text(lambda: _text(page, "#lora-get-message"), timeout=60,
                            key=lambda t, r=reason: r if r in t else t)
        assert message == reason, message
    assert sorted(list_adapters(loras)) == before
    assert not list(root.rglob("evil.txt")) and not any((loras / ".uploads").iterdir())
    screenshot(page, "lora-get-adapter", "#lora-get")
    page.context.close()


def test_the_list_reads_at_390_px(browser, world):
    """Item 10 (c): on a 390 px wide phone the badge takes a line of its own under the tick and the weight (it was a
    column one word wide, 30 px, a word per line)."""
    app, root, loras, src = world
    page = browser.new_context(viewport={"width": 390, "height": 844}).new_page()
    page.goto(app.url)
    page.wait_for_selector("#chat-input textarea", timeout=60_000)
    tab(page, "Model")
    wait_text(lambda: page.inner_text("#lora-badge-A"), timeout=60, key=lambda t: "ok" if "ok" in t else t)
    badge, tick = page.locator("#lora-badge-A").bounding_box(), page.locator("#lora-on-A").bounding_box()
    assert badge["width"] > 0.75 * 390, badge
    assert badge["y"] >= tick["y"] + tick["height"] - 1, (badge, tick)  # under the tick, not beside it
    assert page.evaluate("document.documentElement.scrollWidth") <= 390  # nothing wider than the screen
    screenshot(page, "lora-panel-390px", "#lora-panel")
    page.context.close()


def _shown_settings(page) -> set[str]:
    ids = page.evaluate("[...document.querySelectorAll('[id^=setting-]')].filter(e => e.offsetParent !== null)"
                        ".map(e => e.id)")
    return {i.removeprefix("setting-") for i in ids}


def test_auto_shows_the_settings_of_the_loader_it_picks(browser, world):
    """Item 10 (d): with loader auto, the settings of the loader the registry detects for the chosen model (a
    safetensors folder: transformers; the embedded GGUF: llama.cpp where installed), not every loader's at once."""
    app, root, loras, src = world
    page = open_app(browser, app.url)
    tab(page, "Model")
    assert page.input_value("#model-loader input") == "auto"
    every = {s for n in registry.available() for s in registry.backend_class(n).settings}
    want = set(registry.backend_class("transformers").settings)
    assert want < every
    assert _shown_settings(page) == want, _shown_settings(page)
    assert "auto → transformers" in page.inner_text("#model-auto-loader")

    embedded = next(n for n in registry.available() if registry.backend_class(n).embedded_by_default)
    _pick(page, "model-select", "(embedded) SmolLM2-135M-Instruct")
    wait_text(lambda: page.inner_text("#model-auto-loader"), timeout=30,
              key=lambda t: "picked" if f"auto → {embedded}" in t else t)
    assert _shown_settings(page) == set(registry.backend_class(embedded).settings)

    _pick(page, "model-loader", "transformers")  # a loader asked for by name: its own settings
    wait_text(lambda: str(_shown_settings(page) == want), "True", timeout=30)
    assert _shown_settings(page) == want and page.inner_text("#model-auto-loader").strip() == ""
    page.context.close()
