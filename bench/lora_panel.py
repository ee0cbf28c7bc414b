"""How fast the LoRA panel appears with a big library, in a real browser (Debian's Chromium, headless, driven by
Playwright), against the real app (app.py, the embedded SmolLM2 on transformers) with 100 adapters in its loras
folder and no cached reports:

- lora_panel_first_paint: seconds from clicking the Model tab (on a page that has just become usable) until
  the LoRA list's rows are visible; the reference is how long the page itself took to become usable
  (navigation → chat box visible), measured in the same visits. The note adds the time until every
  compatibility report had arrived in the first (cold) visit.
"""
from __future__ import annotations

import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from bench.common import Row
from webui.backends import embedded

ROWS = ("lora_panel_first_paint",)
ADAPTERS = 100
ROOT = Path(__file__).resolve().parent.parent
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]


def write_library(base: Path, loras: Path, n: int) -> None:
    """n adapters: a few distinct ones from PEFT (different ranks and targets), copied under n names."""
    from webui.testing.tiny_models import write_adapter

    kinds = [write_adapter(base, loras / ".src" / f"k{i}", target_modules=t, r=r, seed=i)
             for i, (t, r) in enumerate([(["q_proj", "v_proj"], 8), (["o_proj", "down_proj"], 4),
                                         ("all-linear", 16)])]
    for i in range(n):
        shutil.copytree(kinds[i % len(kinds)], loras / f"adapter-{i:03d}")
    shutil.rmtree(loras / ".src")


def _app(models_dir: Path, base: Path, loras: Path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(Path(tempfile.gettempdir()) / f"lora-deck-bench-{port}.log", "w")  # noqa: SIM115  (the app's)
    proc = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--port", str(port), "--model", base.name,
                             "--loader", "transformers", "--models-dir", str(models_dir), "--loras-dir", str(loras)],
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the app exited with {proc.returncode}; see {log.name}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                return proc, url
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"the app did not start; see {log.name}")


def visit(browser, url: str, rows: int, wait_reports: bool) -> tuple[float, float, float | None]:
    """(page usable, click → list visible, click → all reports shown) in seconds, for one fresh page."""
    page = browser.new_context(viewport={"width": 1280, "height": 1100}).new_page()
    try:
        start = time.perf_counter()
        page.goto(url)
        page.wait_for_selector("#chat-input textarea", timeout=120_000)
        usable = time.perf_counter() - start
        click = time.perf_counter()
        page.get_by_role("tab", name="Model").click()
        page.locator(".lora-row").nth(rows - 1).wait_for(state="visible", timeout=120_000)
        listed = time.perf_counter() - click
        reports = None
        if wait_reports:
            deadline = time.time() + 600
            while "all checked" not in page.inner_text("#lora-count") and time.time() < deadline:
                time.sleep(0.1)
            reports = time.perf_counter() - click
        return usable, listed, reports
    finally:
        page.context.close()


def run(models_dir: Path, quick: bool = False, only: set | None = None) -> list[Row]:
    from playwright.sync_api import sync_playwright

    from webui.ui.lora_list import PAGE

    reps = 3 if quick else 7
    base = embedded.ensure_transformers_folder(models_dir)
    with tempfile.TemporaryDirectory() as tmp:
        loras = Path(tmp) / "loras"
        write_library(base, loras, ADAPTERS)
        proc, url = _app(models_dir, base, loras)
        try:
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=os.environ.get("CHROMIUM", "/usr/bin/chromium"),
                                            args=CHROMIUM_ARGS)
                runs = [visit(browser, url, min(PAGE, ADAPTERS), wait_reports=(i == 0)) for i in range(reps)]
                browser.close()
        finally:
            proc.terminate()
            proc.wait(30)
    usable = statistics.median(r[0] for r in runs)
    listed = statistics.median(r[1] for r in runs)
    note = (f"{ADAPTERS} adapters ({min(PAGE, ADAPTERS)} rows drawn), no cached reports at the first visit; "
            f"click on the Model tab → rows visible (reference: page load → chat box); every report shown "
            f"{runs[0][2]:.1f} s after the first click")
    return [Row(ROWS[0], listed, usable, "s", False, note)]
