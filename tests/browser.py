"""Helpers for the browser tests: Chromium's flags (the `browser` fixture in conftest.py launches Debian's
Chromium with them) and small actions on LoRA Deck's page (set a number, send a message, wait for a reply)."""
from __future__ import annotations

import re
import time
from pathlib import Path

ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


def norm(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def words(text: str) -> str:
    """Letters, digits and single spaces only: what survives Markdown rendering of any reply."""
    return norm(re.sub(r"[^A-Za-z0-9]+", " ", text))


def open_app(browser, url: str):
    page = browser.new_context(viewport={"width": 1280, "height": 1100}).new_page()
    page.goto(url)
    page.wait_for_selector("#chat-input textarea", timeout=60_000)
    return page


def tab(page, name: str) -> None:
    page.get_by_role("tab", name=name).click()


def set_number(page, elem_id: str, value) -> None:
    box = page.locator(f"#{elem_id} input[type=number]").first
    box.fill(str(value))
    box.press("Enter")


def greedy(page, max_new: int) -> None:
    tab(page, "Parameters")
    set_number(page, "param-temperature", 0)
    set_number(page, "param-max_new_tokens", max_new)
    tab(page, "Chat")


def send(page, text: str) -> None:
    page.fill("#chat-input textarea", text)
    page.locator("#chat-input textarea").press("Enter")


def wait_text(read, expected: str | None = None, timeout: float = 90, key=norm) -> str:
    """Poll read() until its text equals `expected` (compared through `key`) or, with no expectation,
    until it is non-empty and stops changing. Returns the last text seen (through `key`)."""
    deadline, last, stable = time.time() + timeout, None, 0
    while time.time() < deadline:
        text = key(read() or "")
        if expected is not None and text == key(expected):
            return text
        stable = stable + 1 if text == last and text else 0
        if expected is None and stable >= 6:
            return text
        last = text
        time.sleep(0.25)
    return last or ""


def bot_text(page, index: int):
    def read():
        bots = page.locator("#chatbot [data-testid=bot]")
        return bots.nth(index).inner_text() if bots.count() > index else ""
    return read


def compare_answers(page) -> dict[str, str]:
    """Compare mode's cards as {target name: its reply's words}."""
    cards = page.locator("#compare-result .compare-card")
    return {cards.nth(i).get_attribute("data-name"): words(cards.nth(i).locator("pre").inner_text())
            for i in range(cards.count())}


def screenshot(page, name: str, selector: str | tuple | None = None) -> None:
    """The whole page (or the element `selector` picks, or the area from the first to the last of a tuple of
    selectors) into test-artifacts/NAME.png, where docs' pictures come from."""
    ARTIFACTS.mkdir(exist_ok=True)
    if isinstance(selector, tuple):
        boxes = [page.locator(s).first.bounding_box() for s in selector]  # relative to the viewport
        scroll = page.evaluate("[window.scrollX, window.scrollY]")
        boxes = [{**b, "x": b["x"] + scroll[0], "y": b["y"] + scroll[1]} for b in boxes]  # to the page's
        top, bottom = min(b["y"] for b in boxes), max(b["y"] + b["height"] for b in boxes)
        left, right = min(b["x"] for b in boxes), max(b["x"] + b["width"] for b in boxes)
        page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True,
                        clip={"x": left, "y": top, "width": right - left, "height": bottom - top})
    elif selector:
        page.locator(selector).screenshot(path=str(ARTIFACTS / f"{name}.png"))
    else:
        page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)
