"""The LoRA workflow in a real browser (Chromium driven by Playwright) against the real app, with the
embedded SmolLM2 and two adapters: apply an adapter on the Model tab and get its reply in the Chat tab
(equal to plain PEFT's), change its weight, remove it, a broken adapter shows its error while chatting
goes on, compare mode shows the base and each adapter side by side, and a conversation is saved and
loaded again. A screenshot of each tab is kept in test-artifacts/."""
import json
import shutil
import time

import pytest

from tests.browser import bot_text, compare_answers, greedy, open_app, screenshot, send, tab, wait_text, words
from tests.helpers import chat_reference, peft_reference
from webui.testing.tiny_models import write_adapter

MAX_NEW = 16
QUESTION = "Hello! Who are you?"


@pytest.fixture(scope="module")
def world(embedded_folder, tmp_path_factory):
    root = tmp_path_factory.mktemp("ui-lora")
    models, loras = root / "models", root / "loras"
    models.mkdir()
    (models / embedded_folder.name).symlink_to(embedded_folder, target_is_directory=True)
    write_adapter(embedded_folder, loras / "A", target_modules=["q_proj", "v_proj"], r=8, seed=11)
    write_adapter(embedded_folder, loras / "B", target_modules=["o_proj", "down_proj"], r=4, seed=12)
    shutil.copytree(loras / "A", loras / "broken")
    w = loras / "broken" / "adapter_model.safetensors"
    w.write_bytes(w.read_bytes()[:64])

    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(embedded_folder))
    prompt = tok.apply_chat_template([{"role": "user", "content": QUESTION}], tokenize=False,
                                     add_generation_prompt=True)

    def ref(adapters):
        if not adapters:
            return chat_reference(embedded_folder, QUESTION, MAX_NEW)
        return peft_reference(embedded_folder, {n: (loras / n, w) for n, w in adapters.items()}, prompt, MAX_NEW)[0]

    refs = {"base": ref({}), "A": ref({"A": 1.0}), "A/2": ref({"A": 0.5}), "B": ref({"B": 1.0})}
    assert len({words(v) for v in refs.values()}) == 4, refs
    return root, models, loras, refs


def test_lora_workflow(browser, start_app, world):
    root, models, loras, refs = world
    app = start_app("--model", "SmolLM2-135M-Instruct", "--loader", "transformers", "--models-dir", str(models),
                    "--loras-dir", str(loras), "--user-dir", str(root / "user"))
    page = open_app(browser, app.url)
    greedy(page, MAX_NEW)
    screenshot(page, "tab-chat-empty")
    tab(page, "Parameters")
    screenshot(page, "tab-parameters")

    # apply A with one click on the Model tab; its reply in the Chat tab is PEFT's
    tab(page, "Model")
    page.locator("#lora-on-A input[type=checkbox]").check()
    assert wait_text(lambda: page.inner_text("#lora-message"), "Active: A × 1", timeout=60) == "Active: A × 1"
    # reports arrive in the background: the broken adapter's badge says so once its report is in
    assert wait_text(lambda: page.inner_text("#lora-badge-broken"), "broken", timeout=60,
                     key=lambda t: "broken" if "broken" in t else t) == "broken"
    screenshot(page, "tab-model")
    tab(page, "Chat")
    # the status line refreshes every few seconds: wait for it to show the adapter
    assert wait_text(lambda: page.inner_text("#chat-status"), "A × 1", timeout=20,
                     key=lambda t: "A × 1" if "A × 1" in t else t) == "A × 1"
    send(page, QUESTION)
    assert wait_text(bot_text(page, 0), refs["A"], key=words) == words(refs["A"])

    # change its weight: takes effect at once, no reload
    tab(page, "Model")
    box = page.locator("#lora-weight-A input[type=number]").first
    box.fill("0.5")
    box.press("Enter")
    assert wait_text(lambda: page.inner_text("#lora-message"), "Active: A × 0.5", timeout=60) == "Active: A × 0.5"
    tab(page, "Chat")
    page.click("#chat-regenerate")
    assert wait_text(bot_text(page, 0), refs["A/2"], key=words) == words(refs["A/2"])

    # a broken adapter: a readable error in the page, A stays active, chatting goes on
    tab(page, "Model")
    page.locator("#lora-on-broken input[type=checkbox]").check()
    msg = wait_text(lambda: page.inner_text("#lora-message"), timeout=30)
    assert "broken" in msg and "corrupt or truncated" in msg
    assert not page.locator("#lora-on-broken input[type=checkbox]").is_checked()
    tab(page, "Chat")
    page.click("#chat-regenerate")
    assert wait_text(bot_text(page, 0), refs["A/2"], key=words) == words(refs["A/2"])

    # remove it: the base answers
    tab(page, "Model")
    page.locator("#lora-on-A input[type=checkbox]").uncheck()
    assert wait_text(lambda: page.inner_text("#lora-message"), timeout=30).startswith("Active: none")
    tab(page, "Chat")
    page.click("#chat-regenerate")
    assert wait_text(bot_text(page, 0), refs["base"], key=words) == words(refs["base"])

    # save the conversation, clear, load it back
    page.locator("#chat-input textarea").click()  # (focus stays in the page)
    page.click("text=Saved conversations")
    page.fill("#conv-name textarea, #conv-name input", "first chat")
    page.click("#conv-save")
    assert "Saved" in wait_text(lambda: page.inner_text("#conv-status"), timeout=30)
    page.click("#chat-clear")
    wait_text(lambda: str(page.locator("#chatbot [data-testid=bot]").count()), "0", timeout=10)
    pick = page.locator("#conv-list input").first
    pick.fill("first chat")
    pick.press("Enter")
    page.click("#conv-load")
    assert wait_text(bot_text(page, 0), refs["base"], key=words) == words(refs["base"])
    assert (root / "user" / "conversations" / "first chat.json").is_file()

    # compare mode: base, A and B side by side
    page.click("text=Compare: base vs adapters")
    page.locator("#compare-adapters label", has_text="A").first.click()
    page.locator("#compare-adapters label", has_text="B").first.click()
    page.fill("#compare-prompt textarea", QUESTION)
    page.click("#compare-go")

    want = {"base": words(refs["base"]), "A": words(refs["A"]), "B": words(refs["B"])}
    got = wait_text(lambda: str(compare_answers(page)), str(want), timeout=90, key=lambda s: s)
    assert got == str(want)
    screenshot(page, "tab-chat-compare")
    tab(page, "Training")
    screenshot(page, "tab-training")


# Records every text the LoRA list's count line shows, from the first paint on (a poll inside the page,
# so a state that lasts only until the first report arrives is still seen).
RECORD_COUNT = """window.__counts = [];
setInterval(() => { const el = document.querySelector('#lora-count');
  if (el) { const t = el.innerText; if (window.__counts[window.__counts.length - 1] !== t) window.__counts.push(t); }
}, 20);"""


def test_big_library(browser, start_app, world, tmp_path):
    """30 adapters: the list appears with every report pending, the reports then arrive (ok for the copies of A,
    broken for the truncated one), and search, the status filter and the library's rename work in the page."""
    _, models, loras, _ = world
    lib = tmp_path / "loras"
    for i in range(28):
        shutil.copytree(loras / "A", lib / f"style-{i:02d}")
    shutil.copytree(loras / "B", lib / "special-B")
    shutil.copytree(loras / "broken", lib / "broken")
    app = start_app("--model", "SmolLM2-135M-Instruct", "--loader", "transformers", "--models-dir", str(models),
                    "--loras-dir", str(lib), "--user-dir", str(tmp_path / "user"))
    context = browser.new_context(viewport={"width": 1280, "height": 1100})
    context.add_init_script(RECORD_COUNT)
    page = context.new_page()
    page.goto(app.url)
    page.wait_for_selector("#chat-input textarea", timeout=60_000)
    tab(page, "Model")
    page.locator(".lora-row").first.wait_for(state="visible", timeout=30_000)
    first = page.evaluate("window.__counts")[0]
    assert "30 of 30 adapters" in first and "checking compatibility of 30" in first, first  # drawn before any report
    assert wait_text(lambda: page.inner_text("#lora-count"), "compatibility checked", timeout=120,
                     key=lambda t: "compatibility checked" if "compatibility checked" in t else t) \
        == "compatibility checked"
    assert "ok" in page.inner_text("#lora-badge-style-00")
    # reports of rows beyond the first page arrive too, and are on disk for the next start
    cached = json.loads((lib / ".cache" / "reports.json").read_text())["reports"]
    assert len(cached) == 30
    screenshot(page, "lora-big-library")

    page.fill("#lora-search textarea, #lora-search input", "special")
    assert wait_text(lambda: str(page.locator(".lora-row").count()), "1", timeout=30) == "1"
    assert page.locator("#lora-on-special-B").is_visible()
    page.fill("#lora-search textarea, #lora-search input", "")
    assert wait_text(lambda: str(page.locator(".lora-row").count()), "25", timeout=30) == "25"  # one page of 30
    status = page.locator("#lora-filter-status input")
    status.fill("incompatible")
    status.press("Enter")
    page.locator("#lora-on-broken").wait_for(state="visible", timeout=30_000)
    assert wait_text(lambda: str(page.locator(".lora-row").count()), "1", timeout=30) == "1"


def test_rows_are_not_redrawn_under_the_users_clicks(browser, start_app, world, tmp_path):
    """Issue 29, item 1: tick A, then keep editing B's weight, as fast as a user does. The panel used to redraw
    every row a few seconds after each tick (its watch saw the active stack change), and an edit on its way to the
    old rows failed in Gradio (a red "Error", the adapter not applied). Every edit must reach the server."""
    root, models, loras, _ = world
    app = start_app("--model", "SmolLM2-135M-Instruct", "--loader", "transformers", "--models-dir", str(models),
                    "--loras-dir", str(loras), "--user-dir", str(tmp_path / "user"))
    page = open_app(browser, app.url)
    tab(page, "Model")
    page.locator("#lora-on-B input[type=checkbox]").check()
    assert wait_text(lambda: page.inner_text("#lora-message"), "Active: B × 1", timeout=60) == "Active: B × 1"
    weight = page.locator("#lora-weight-B input[type=number]")
    for i in range(5):  # each tick of A changes the active stack; the edits of B's weight go on meanwhile
        page.locator("#lora-on-A input[type=checkbox]").set_checked(i % 2 == 0)
        end = time.time() + 4  # longer than the panel's 3 s watch
        k = 0
        while time.time() < end:
            k += 1
            weight.fill(f"{0.1 + (k % 9) / 10:.1f}")
            weight.press("Enter")
            page.wait_for_timeout(40)
    weight.fill("0.5")
    weight.press("Enter")
    want = "Active: A × 1, B × 0.5"
    assert wait_text(lambda: page.inner_text("#lora-message"), want, timeout=60) == want
    assert page.locator(".toast-body.error, .toast-wrap .error").count() == 0, page.inner_text("body")[:500]

    # a change made elsewhere (an adapter a training run just finished, here copied in) is still drawn
    shutil.copytree(loras / "A", loras / "arrived")
    try:
        box = page.locator("#lora-on-arrived")
        assert wait_text(lambda: str(box.count()), "1", timeout=30) == "1"
    finally:
        shutil.rmtree(loras / "arrived")
    page.context.close()


def test_a_row_drawn_after_a_change_elsewhere_answers_the_first_click(browser, start_app, world, tmp_path):
    """Issue 29, item 1 (a): an adapter arrives while the Model tab is hidden (a finished run, a fetch in another
    tab); the user opens the tab, sees the new row and ticks it at once. The tick must reach the server."""
    root, models, loras, _ = world
    app = start_app("--model", "SmolLM2-135M-Instruct", "--loader", "transformers", "--models-dir", str(models),
                    "--loras-dir", str(loras), "--user-dir", str(tmp_path / "user"))
    page = open_app(browser, app.url)
    shutil.copytree(loras / "A", loras / "late")
    try:
        page.wait_for_timeout(4000)
        tab(page, "Model")
        assert wait_text(lambda: str(page.locator("#lora-on-late").count()), "1", timeout=30) == "1"
        page.locator("#lora-on-late input[type=checkbox]").check()
        got = wait_text(lambda: page.inner_text("#lora-message"), "Active: late × 1", timeout=30)
        assert got == "Active: late × 1", (got, page.locator(".toast-body").all_inner_texts())
    finally:
        shutil.rmtree(loras / "late")
    page.context.close()
