"""The Evaluate tab in the real app, in headless Chromium: pick two adapters and a stack, a dataset and prompts,
run with progress, and see the results table (with the general-text check), the perplexity chart, a strength
sweep's curve, the answers side by side and the report files; a missing dataset is named in the tab and nothing
runs."""
import json

from tests.browser import open_app, screenshot, tab, wait_text
from tests.helpers import write_data


def _fill(page, elem_id: str, value) -> None:
    box = page.locator(f"#{elem_id} textarea, #{elem_id} input").first
    box.fill(str(value))
    box.press("Enter")


def test_evaluate_from_the_evaluate_tab(browser, start_app, gguf_models, llama_loras, tmp_path):
    data = write_data(tmp_path / "data")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Color number 1?\nSay hello 2\n")
    user = tmp_path / "user"
    app = start_app("--model", "tiny-llama", "--loader", "transformers", "--models-dir", str(gguf_models),
                    "--loras-dir", str(llama_loras), "--user-dir", str(user))
    page = open_app(browser, app.url)
    tab(page, "Evaluate")

    _fill(page, "eval-dataset", tmp_path / "missing.jsonl")
    page.click("#eval-run")
    assert "not found" in wait_text(lambda: page.inner_text("#eval-status"), timeout=30).lower()

    page.locator("#eval-adapters label", has_text="A").first.click()
    page.locator("#eval-adapters label", has_text="B").first.click()
    page.locator("#eval-stacks textarea").fill("A=1, B=0.5")
    page.locator("#eval-sweeps textarea").fill("A=0,0.5,1,1.5")
    _fill(page, "eval-dataset", data["chat"])
    page.locator("#eval-format input").first.click()
    page.get_by_role("option", name="chat", exact=True).click()
    assert wait_text(lambda: page.input_value("#eval-format input"), "chat", timeout=10) == "chat"
    _fill(page, "eval-prompts", prompts)
    page.click("#eval-run")
    status = wait_text(lambda: page.inner_text("#eval-status"), "done", timeout=120,
                       key=lambda t: "done" if "Done" in t else t)
    assert status == "done", page.inner_text("#eval-status")
    assert page.locator("#eval-result table.results tr.result").count() == 4
    cells = page.locator("#eval-result tr.result").first.locator("td").count()  # 9, and 2 of the general text check
    assert cells == 11
    assert [page.locator("#eval-result tr.result td").nth(i * cells).inner_text() for i in range(4)] == \
        ["base", "A", "B", "A=1,B=0.5"]
    assert page.locator("#eval-result #perplexity-chart rect.bar").count() == 4
    assert page.locator("#eval-result #sweep-chart circle.sweep-point").count() == 4  # the strength sweep's curve
    assert page.locator("#eval-result td.general").count() == 3
    assert page.locator("#eval-result table.generations tr.generation").count() == 2
    files = page.locator("#eval-files a")
    assert wait_text(lambda: str(files.count()), "2", timeout=10) == "2"
    screenshot(page, "tab-evaluate")
    page.context.close()  # an open page keeps the app's connections (and its shutdown) waiting

    reports = list((user / "evals").glob("*/report.json"))
    assert len(reports) == 1 and (reports[0].parent / "report.html").is_file()
    report = json.loads(reports[0].read_text())
    assert [r["name"] for r in report["results"]] == ["base", "A", "B", "A=1,B=0.5"]
    assert report["dataset"]["samples"] == 12
    assert [p["scale"] for p in report["sweeps"][0]["points"]] == [0, 0.5, 1, 1.5]
    assert report["sweeps"][0]["points"][2]["loss"] == report["results"][1]["loss"]  # scale 1 is A's own row
