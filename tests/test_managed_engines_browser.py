"""The managed vLLM loader (`--loader vllm`) from the Model tab, in headless Chromium: a LoRA Deck started on a
small transformers model loads a 256-wide Llama folder with the loader `vllm`, so it starts vLLM's CPU build
itself (scripts/install-vllm.sh); the status line names the engine, its address and its process; the chat
answers (the base, then adapter A ticked in the LoRA panel) and compare's base and A cards each equal the same
chat sent straight to that vLLM; and when the app stops, the guardian ends vLLM and every process it started.
One vLLM start (about 1-5 minutes here); the module is skipped when vLLM's CPU build is not installed. The
same for llama-server through the Engine, and the app killed with SIGKILL, is in test_managed_llama_server.py.
vLLM's CPU attention needs a head size of 64 or so, hence the 256-wide model (4 heads) and not the tiny ones."""
from __future__ import annotations

import re
import signal
import time

import httpx
import psutil
import pytest

from tests.browser import bot_text, compare_answers, greedy, open_app, screenshot, send, tab, wait_text, words
from tests.helpers import streamed_chat, write_llama
from webui.backends.remote.managed import cached_program

if not cached_program("install-vllm.sh"):
    pytest.skip("vLLM's CPU build is not installed (bash scripts/install-vllm.sh, about 4 minutes)",
                allow_module_level=True)

MAX_NEW = 12
QUESTION = "Name three colors."
LOAD_TIMEOUT = 360  # seconds: vLLM starts in 45-90 s on 2 idle cores, several times that beside other tests


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """models/{starter (what the app starts on), llama256 (for vLLM)} and loras/{A, B} for llama256."""
    from webui.testing.tiny_models import write_adapter

    root = tmp_path_factory.mktemp("managed-vllm")
    models, loras = root / "models", root / "loras"
    write_llama(models / "starter", 64, seed=3)
    base = write_llama(models / "llama256", 256)
    write_adapter(base, loras / "A", target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], r=4, alpha=8, seed=1)
    write_adapter(base, loras / "B", target_modules="all-linear", r=8, alpha=16, seed=2)
    return root, models, loras


def direct(url: str, model: str) -> str:
    """The chat straight to vLLM's chat route, greedy, streamed as LoRA Deck streams it."""
    return streamed_chat(url, {"messages": [{"role": "user", "content": QUESTION}], "temperature": 0,
                               "max_tokens": MAX_NEW, "model": model}, timeout=300)


def engine_log(root) -> str:
    logs = sorted((root / "engine-logs").glob("vllm-*.log"))
    return logs[-1].read_text(errors="replace")[-3000:] if logs else "(no engine log)"


def test_vllm_from_the_model_tab(browser, start_app, world):
    root, models, loras = world
    app = start_app("--model", "starter", "--loader", "transformers", "--models-dir", str(models), "--loras-dir",
                    str(loras), "--user-dir", str(root / "user"),
                    env={"LORADECK_ENGINE_LOGS": str(root / "engine-logs")})  # vLLM's log for a failed load
    page = open_app(browser, app.url)
    greedy(page, MAX_NEW)
    tab(page, "Model")
    pick = page.locator("#model-select input").first
    pick.fill("llama256")
    pick.press("Enter")
    loader = page.locator("#model-loader input").first
    loader.fill("vllm")
    loader.press("Enter")
    page.locator("#setting-engine_max_loras").wait_for(state="visible", timeout=30_000)  # vllm's settings shown
    page.click("#model-load")
    wait_text(lambda: page.inner_text("#model-status"), "done", timeout=LOAD_TIMEOUT,
              key=lambda t: "done" if "Loaded in" in t or "⚠️" in t else t)  # loaded, or the reason it was not
    status = page.inner_text("#model-status")
    assert "Loaded in" in status, (status, engine_log(root))
    # the LoRA panel's verdicts follow the new base (judged on the adapters' files: vLLM's layers are not visible
    # from here), not the 64-wide starter's, against which both adapters were incompatible
    for name in ("A", "B"):
        badge = wait_text(lambda: page.inner_text(f"#lora-badge-{name}"), "ok", timeout=60,
                          key=lambda t: "ok" if "● ok" in t else t)
        assert badge == "ok", badge
    screenshot(page, "tab-model-managed-vllm")
    # the engine LoRA Deck runs: its address and its process (the guardian's pid) on the status line
    found = re.search(r"managed vllm engine at (http://127\.0\.0\.1:(\d+)) · vllm running \(pid (\d+), port (\d+)\)",
                      status)
    assert found and found[2] == found[4], status
    url, port, guardian = found[1], found[2], psutil.Process(int(found[3]))
    assert guardian.ppid() == app.proc.pid and "webui.backends.remote.guardian" in guardian.cmdline()
    assert "llama256" in status and "context 256 tokens" in status, status
    engine = guardian.children()[0]
    assert "vllm.entrypoints.openai.api_server" in engine.cmdline() and port in engine.cmdline()
    assert httpx.get(app.url + "/health", timeout=30).json()["loader"] == "vllm"

    refs = {"base": direct(url, "llama256")}
    tab(page, "Chat")
    send(page, QUESTION)
    assert wait_text(bot_text(page, 0), refs["base"], timeout=120, key=words) == words(refs["base"])

    # adapter A, one tick in the LoRA panel: registered with vLLM at run time, and the chat answers with it
    tab(page, "Model")
    page.locator("#lora-on-A input[type=checkbox]").check()
    assert wait_text(lambda: page.inner_text("#lora-message"), "Active: A × 1", timeout=240) == "Active: A × 1", \
        page.inner_text("#lora-message")
    served = [m["id"] for m in httpx.get(url + "/v1/models", timeout=30).json()["data"]]
    assert "A" in served, served
    refs["A"] = direct(url, "A")
    assert words(refs["A"]) and words(refs["A"]) != words(refs["base"]), refs  # A changes the answer
    tab(page, "Chat")
    page.click("#chat-regenerate")
    assert wait_text(bot_text(page, 0), refs["A"], timeout=120, key=words) == words(refs["A"])

    # compare: the base and A side by side (requested together, so vLLM batches them), each vLLM's own answer
    page.click("text=Compare: base vs adapters")
    page.locator("#compare-adapters label", has_text="A").first.click()
    page.fill("#compare-prompt textarea", QUESTION)
    page.click("#compare-go")

    want = {"base": words(refs["base"]), "A": words(refs["A"])}
    assert wait_text(lambda: str(compare_answers(page)), str(want), timeout=120, key=lambda s: s) == str(want)

    # the app stops (the page still open): the guardian ends vLLM and every process vLLM started
    procs = [guardian, *guardian.children(recursive=True)]
    assert len(procs) >= 3, procs  # the guardian, the API server and at least vLLM's engine core
    app.proc.send_signal(signal.SIGTERM)
    app.proc.wait(30)  # within uvicorn's shutdown grace (webui/web/server.py), though the page is open
    _, alive = psutil.wait_procs(procs, timeout=40)
    left = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert left == [], [p.cmdline() for p in left]
    time.sleep(1)
    on_port = [p.info["cmdline"] for p in psutil.process_iter(["cmdline"])
               if "vllm.entrypoints.openai.api_server" in (p.info["cmdline"] or []) and port in p.info["cmdline"]]
    assert on_port == []
