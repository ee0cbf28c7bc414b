"""The Chat tab's ratings and preference pairs in Chromium, on the embedded model with sampling: a reply rated 👍,
regenerated, the better of the two chosen; the files on disk hold the rating and the pair in TRL's formats with
the chat as the prompt (system prompt, history, the user's turn) and the texts the page showed; "Train on these"
opens the Training tab with the set as its dataset."""
import json
import time

from tests.browser import bot_text, open_app, screenshot, set_number, tab, wait_text, words

SYSTEM = "You answer in one short sentence."
FIRST, SECOND = "Hello! Who are you?", "Name a colour you like."
TRIES = 4  # sampling makes equal replies rare; a few regenerates make a difference certain enough


def _rows(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _type_into(page, selector: str, text: str) -> None:
    """Fill a box until the text stays: a box just rendered (its accordion opened) or one an event is updating can
    take its value back a moment after a fill."""
    for _ in range(5):
        page.fill(selector, text)
        time.sleep(1)
        if page.input_value(selector) == text:
            return
    raise AssertionError(f"{selector} does not keep {text!r}")


def _send(page, text: str, index: int) -> None:
    """Send the chat's message number `index` (from 0). The last update of the reply before can empty the box just
    after a fill, and Enter then sends nothing: send again until the message is in the chat."""
    for _ in range(5):
        _type_into(page, "#chat-input textarea", text)
        page.locator("#chat-input textarea").press("Enter")
        try:
            page.wait_for_function(f"document.querySelectorAll('#chatbot [data-testid=user]').length > {index}",
                                   timeout=10_000)
            return
        except Exception:
            continue
    raise AssertionError(f"{text!r} was not sent")


def _reply(page, index: int) -> str:
    """Reply `index` once it is complete: the "Last reply" line, cleared when the reply starts, is back."""
    page.wait_for_function(f"document.querySelectorAll('#chatbot [data-testid=bot]').length > {index}",
                           timeout=60_000)
    page.wait_for_function("document.querySelector('#chat-answered').innerText.includes('Last reply')",
                           timeout=90_000)
    return words(bot_text(page, index)())


def test_rate_regenerate_choose_and_train(browser, start_app, embedded_folder, tmp_path):
    models, user = tmp_path / "models", tmp_path / "user"
    models.mkdir()
    (models / embedded_folder.name).symlink_to(embedded_folder, target_is_directory=True)
    runs, loras = tmp_path / "runs", tmp_path / "loras"
    app = start_app("--models-dir", str(models), "--loader", "transformers", "--user-dir", str(user),
                    "--runs-dir", str(runs), "--loras-dir", str(loras))
    page = open_app(browser, app.url)
    tab(page, "Parameters")  # sampling with a random seed: a regenerated reply differs
    set_number(page, "param-temperature", 1.0)
    set_number(page, "param-seed", -1)
    set_number(page, "param-max_new_tokens", 12)
    tab(page, "Chat")
    page.get_by_text("System prompt", exact=True).click()
    _type_into(page, "#chat-system textarea", SYSTEM)
    assert "0 pairs" in page.inner_text("#chat-pref-counts") and "0 ratings" in page.inner_text("#chat-pref-counts")

    _send(page, FIRST, 0)
    first = _reply(page, 0)
    _send(page, SECOND, 1)
    rated = _reply(page, 1)
    assert first and rated

    # 👍 on the second reply: one rating, the chat up to it as the prompt
    page.locator("#chatbot [data-testid=bot]").nth(1).hover()
    page.locator("#chatbot button[aria-label='Like']").last.click()
    assert "Rated good" in wait_text(lambda: page.inner_text("#chat-pref-status"), timeout=20)
    assert "1 rating" in page.inner_text("#chat-pref-counts")
    ratings_file = user / "preferences" / "chat-preferences.ratings.jsonl"
    [rating] = _rows(ratings_file)
    assert set(rating) == {"prompt", "completion", "label"} and rating["label"] is True
    assert [m["role"] for m in rating["prompt"]] == ["system", "user", "assistant", "user"]
    assert [m["content"] for m in rating["prompt"][:2]] == [SYSTEM, FIRST] and rating["prompt"][3]["content"] == SECOND
    assert words(rating["prompt"][2]["content"]) == first
    assert [m["role"] for m in rating["completion"]] == ["assistant"]
    assert words(rating["completion"][0]["content"]) == rated

    # Regenerate: the box shows the reply before and the new one, until they differ
    for _ in range(TRIES):
        page.click("#chat-regenerate")
        page.wait_for_selector("#chat-pref-pair", state="hidden", timeout=20_000)  # the box of the last try goes
        page.wait_for_selector("#chat-pref-pair", state="visible", timeout=90_000)  # and comes back after the reply
        newer = page.input_value("#chat-pref-newer textarea")
        earlier = page.input_value("#chat-pref-earlier textarea")
        if newer.strip() != earlier.strip():
            break
    assert newer.strip() != earlier.strip(), f"{TRIES} regenerates gave the same reply"
    assert words(newer) == _reply(page, 1)  # the new reply is the one in the chat
    page.click("#chat-pref-pick-newer")
    assert "Kept" in wait_text(lambda: page.inner_text("#chat-pref-pair-status"), timeout=20)
    assert "1 pair" in page.inner_text("#chat-pref-counts")
    assert not page.locator("#chat-pref-pick-newer").is_enabled()  # one pair per comparison
    screenshot(page, "chat-preferences", ("#chatbot", "#chat-pref-pair"))  # docs/chat-preferences.png

    pairs_file = user / "preferences" / "chat-preferences.jsonl"
    [pair] = _rows(pairs_file)
    assert pair == {"prompt": rating["prompt"], "chosen": [{"role": "assistant", "content": newer}],
                    "rejected": [{"role": "assistant", "content": earlier}]}
    assert words(earlier) == rated  # a regenerate that gave the same reply again adds no alternative

    # "Train on these": the Training tab, with the set's files as its preference dataset and DPO as its method
    page.click("#chat-pref-train")
    training = page.get_by_role("tab", name="Training")
    assert wait_text(lambda: training.get_attribute("aria-selected"), "true", timeout=20) == "true"
    files = f"{pairs_file.resolve()}, {ratings_file.resolve()}"
    assert wait_text(lambda: page.input_value("#train-data-path textarea, #train-data-path input"), files,
                     timeout=20) == files
    assert page.locator("#train-data-format input").first.input_value() == "preference"
    assert page.locator("#train-method input").first.input_value() == "dpo"

    # ... and a run from it starts, learns from the pair (the rating left to KTO) and shows the margin
    _type_into(page, "#train-output textarea, #train-output input", "chat-dpo")
    set_number(page, "train-opt-max_steps", 2)
    page.click("#train-start")
    deadline = time.time() + 240
    while time.time() < deadline:
        status = page.inner_text("#train-status")
        if "· done" in status or "failed" in status:
            break
        time.sleep(1)
    assert "· done" in status and "margin" in status and "accuracy" in status, status
    metrics = _rows(runs / "chat-dpo" / "metrics.jsonl")
    assert [m["step"] for m in metrics if "margin" in m] == [1, 2]
    assert (loras / "chat-dpo" / "adapter_model.safetensors").is_file()
    assert "1 single rating(s) are for method kto" in page.input_value("#train-log textarea")

    # Clear forgets the alternatives: the box goes until the next regenerate
    tab(page, "Chat")
    assert page.locator("#chat-pref-pair").first.is_visible()
    page.click("#chat-clear")
    page.wait_for_selector("#chat-pref-pair", state="hidden", timeout=20_000)
