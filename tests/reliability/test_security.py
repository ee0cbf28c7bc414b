"""Security of the real app on a loopback port, started once with --auth, --api-key and an extension:

- every route the app serves is listed from the app itself (FastAPI's and the mounted Gradio app's route
  tables), so a route added later is covered without editing this test; anonymous calls to each get 401/403
  (never data), except /health and the few paths a browser needs to show the login form;
- with a logged-in Gradio session and with the key the same routes answer;
- request body size, max_tokens and choices-per-request limits; the schema pages are not served behind a key;
- adapter names that are symlinks out of the adapters folder are refused in every API dialect; presets and
  conversations that are symlinks out of their folder are neither read nor written;
- extensions' input and output hooks run on API requests (OpenAI and LoRAX forms), compared with plain
  transformers' greedy output for the modified prompt.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import requests

from tests.helpers import AppProcess, chat_reference, peft_reference, reference_greedy

USER, PASSWORD, KEY = "ada", "lovelace", "k3y"
MAX = 6
# What an anonymous browser may load: the page shell (which shows the login form), its static files and the
# login form's own routes. None of these runs an event or reads a user's file.
PUBLIC = {"/", "/login", "/login/", "/logout", "/favicon.ico", "/theme.css", "/gradio_api/theme.css", "/robots.txt",
          "/manifest.json", "/gradio_api/user", "/gradio_api/user/", "/gradio_api/token", "/gradio_api/token/"}
PUBLIC_PREFIXES = ("/assets/", "/static/", "/svelte/", "/pwa_icon")
MARKER = '''
def input_modifier(text, state, is_chat=False):
    if text.startswith("pirate"):  # picks an adapter, as lora_router does (used when a request names none)
        state["adapters"] = {"A": 1.0}
    return text + " fox"

def output_modifier(text, state, is_chat=False):
    return "<<" + text + ">>"
'''


@pytest.fixture(scope="module")
def setup(tiny_models, tmp_path_factory):
    from webui.testing.tiny_models import write_adapter

    root = tmp_path_factory.mktemp("security")
    base = tiny_models["llama"]
    loras, outside = root / "loras", root / "outside"
    write_adapter(base, loras / "A", seed=1)
    write_adapter(base, outside / "B", seed=2)
    (loras / "evil").symlink_to(outside / "B", target_is_directory=True)  # listed in loras/, lies outside
    (root / "extensions" / "marker").mkdir(parents=True)
    (root / "extensions" / "marker" / "script.py").write_text(MARKER)
    dirs = {name: root / name for name in ("user", "presets", "runs")}
    args = ["--model", base.name, "--models-dir", str(base.parent), "--loras-dir", str(loras),
            "--user-dir", str(dirs["user"]), "--presets-dir", str(dirs["presets"]), "--runs-dir", str(dirs["runs"]),
            "--extensions-dir", str(root / "extensions"), "--extensions", "marker",
            "--auth", f"{USER}:{PASSWORD}", "--api-key", KEY, "--max-request-mb", "1"]
    return base, loras, args


@pytest.fixture(scope="module")
def app(setup):
    proc = AppProcess(*setup[2]).wait_ready()
    yield proc
    proc.stop()


def served_routes(args: list[str]) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(API routes, web UI routes) as (method, path) pairs, read from the app that `args` build (no model
    needs loading for its route tables). Gradio's routes are those of the app mounted at /."""
    from starlette.routing import Mount

    from webui.cli import _parser
    from webui.engine import Engine
    from webui.options.config import ServerConfig
    from webui.options.flags import from_namespace
    from webui.web.server import build_app

    cfg = from_namespace(ServerConfig, _parser().parse_args(["serve", *args]))
    app = build_app(Engine(cfg.models_dir, cfg.loras_dir), cfg)
    api, ui = [], []

    def walk(routes, prefix: str, out: list) -> None:
        for r in routes:
            if isinstance(r, Mount):
                walk(r.routes, prefix + r.path, ui)
            elif hasattr(r, "original_router"):  # FastAPI's included router
                walk(r.original_router.routes, prefix + r.include_context.prefix, out)
            else:
                out += [(m, prefix + r.path) for m in sorted(getattr(r, "methods", None) or {"GET"})]

    walk(app.routes, "", api)
    return api, ui


def call(url: str, method: str, path: str, **kwargs) -> requests.Response:
    """One request to a route pattern, its parameters filled in (a `:path` one with a file outside the app)."""
    concrete = re.sub(r"\{[^}:]+(:path)?\}", lambda m: "etc/passwd" if m.group(1) else "x1", path)
    r = requests.request(method, url + concrete, timeout=30, allow_redirects=False, stream=True,
                         json={} if method == "POST" else None, **kwargs)
    r.close()  # the head is enough; a stream (heartbeat, queue data) is not read
    return r


def test_every_route_needs_login_or_key(app, setup):
    api, ui = served_routes(setup[2])
    assert len(ui) > 50 and ("POST", "/gradio_api/upload") in ui and ("POST", "/gradio_api/queue/join") in ui
    assert ("GET", "/gradio_api/file={path_or_url:path}") in ui and ("GET", "/gradio_api/info") in ui
    assert {("POST", "/generate"), ("GET", "/lora-adapters"), ("POST", "/v1/load_lora_adapter")} <= set(api)
    open_routes = []
    for method, path in api:
        status = call(app.url, method, path).status_code
        if path == "/health":  # the readiness probe: model name and active adapters, no files, no changes
            assert status == 200
        elif status not in (401, 403):
            open_routes.append(f"{method} {path} → {status}")
    for method, path in ui:
        if path in PUBLIC or path.startswith(PUBLIC_PREFIXES):
            continue
        status = call(app.url, method, path).status_code
        if status not in (401, 403):
            open_routes.append(f"{method} {path} → {status}")
    assert not open_routes, "answered without credentials:\n" + "\n".join(open_routes)
    # the public ones tell an anonymous caller nothing: no user, no token, the page is the login form
    assert requests.get(app.url + "/gradio_api/token", timeout=10).json() == {"token": None, "user": None}
    assert requests.get(app.url + "/config", timeout=10).status_code == 401

    # logged in through Gradio's own form, the UI's routes answer; with the key, the API's
    session = requests.Session()
    assert session.post(app.url + "/login", data={"username": USER, "password": "wrong"}, timeout=10).status_code >= 400
    assert session.post(app.url + "/login", data={"username": USER, "password": PASSWORD}, timeout=10).ok
    for path in ("/config", "/gradio_api/info", "/gradio_api/startup-events"):
        assert session.get(app.url + path, timeout=30).status_code == 200, path
    keyed = {"Authorization": f"Bearer {KEY}"}
    for path in ("/v1/models", "/lora-adapters", "/info"):
        assert requests.get(app.url + path, headers=keyed, timeout=30).status_code == 200, path
    # a Gradio session is not an API key
    assert session.get(app.url + "/v1/models", timeout=10).status_code == 401


def test_request_limits(app):
    keyed = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    big = b'{"model": "", "prompt": "' + b"a" * (2 * 2**20) + b'", "max_tokens": 1}'  # 2 MB > --max-request-mb 1
    for path in ("/v1/completions", "/generate", "/"):
        assert requests.post(app.url + path, data=big, headers=keyed, timeout=30).status_code == 413, path
    cases = [({"max_tokens": 100_000}, "max_new_tokens"),   # over the configured cap (GenerationParams' 8192)
             ({"max_tokens": 4000}, "context"),              # over the tiny model's context
             ({"prompt": ["a"] * 20, "n": 16}, "choices")]   # 320 generations from one small body
    for extra, word in cases:
        r = requests.post(app.url + "/v1/completions", headers=keyed, timeout=60,
                          json={"model": "", "prompt": "a", "max_tokens": 1, **extra})
        assert r.status_code == 400 and word in r.json()["error"]["message"], (extra, r.text)
    r = requests.post(app.url + "/generate", headers=keyed, timeout=60,
                      json={"inputs": "a", "parameters": {"max_new_tokens": 4000}})
    assert r.status_code == 422 and "context" in r.json()["error"]
    for path in ("/docs", "/openapi.json", "/redoc"):  # the API's schema pages: not behind a key, so not served
        assert requests.get(app.url + path, timeout=10).status_code in (401, 403, 404), path


def test_symlinked_adapter_is_refused_in_every_dialect(app, setup):
    keyed = {"Authorization": f"Bearer {KEY}"}
    loras = setup[1]
    listed = requests.get(app.url + "/lora-adapters", headers=keyed, timeout=30).json()
    evil_id = next(e["id"] for e in listed if Path(e["path"]).name == "evil")
    requests_ = [("/v1/completions", {"model": "evil", "prompt": "a", "max_tokens": 1}),
                 ("/v1/completions", {"model": "", "adapters": [{"name": "evil", "weight": 1}], "prompt": "a"}),
                 ("/v1/completions", {"adapter_id": str(loras / "evil"), "adapter_source": "local", "prompt": "a"}),
                 ("/v1/completions", {"lora": [{"id": evil_id, "scale": 1}], "prompt": "a"}),
                 ("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": str(loras / "evil")}),
                 ("/lora-adapters", [{"id": evil_id, "scale": 1.0}]),
                 ("/generate", {"inputs": "a", "parameters": {"adapter_id": "evil", "adapter_source": "local"}}),
                 ("/generate", {"inputs": "a", "parameters": {"merged_adapters": {"ids": ["A", "evil"],
                                                                                   "weights": [1, 1]}}})]
    for path, body in requests_:
        r = requests.post(app.url + path, json=body, headers=keyed, timeout=60)
        assert r.status_code in (400, 422) and "escapes" in r.text, (path, body, r.text)
    assert requests.get(app.url + "/health", timeout=10).json()["adapters"] == {}  # nothing changed


def test_symlinked_presets_and_conversations_are_refused(tmp_path):
    from webui.conversations import load_conversation, save_conversation
    from webui.errors import BadInput
    from webui.options.config import GenerationParams
    from webui.options.presets import load_preset, save_preset

    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "p.yaml").write_text("temperature: 0.1\n")
    (secret / "c.json").write_text('{"messages": []}')
    presets, convs = tmp_path / "presets", tmp_path / "conversations"
    presets.mkdir()
    convs.mkdir()
    (presets / "leak.yaml").symlink_to(secret / "p.yaml")
    (convs / "leak.json").symlink_to(secret / "c.json")
    with pytest.raises(BadInput, match="outside"):
        load_preset(presets, "leak")
    with pytest.raises(BadInput, match="outside"):
        save_preset(presets, "leak", GenerationParams())
    with pytest.raises(BadInput, match="outside"):
        load_conversation(convs, "leak")
    with pytest.raises(BadInput, match="outside"):
        save_conversation(convs, "leak", [{"role": "user", "content": "x"}])
    assert (secret / "p.yaml").read_text() == "temperature: 0.1\n"  # nothing written through the links
    assert (secret / "c.json").read_text() == '{"messages": []}'


def test_extensions_run_on_api_requests(app, setup):
    base = setup[0]
    keyed = {"Authorization": f"Bearer {KEY}"}
    expected = "<<" + reference_greedy(base, "The quick brown fox", MAX) + ">>"  # input hook appended " fox"
    r = requests.post(app.url + "/v1/completions", headers=keyed, timeout=120,
                      json={"model": "", "prompt": "The quick brown", "max_tokens": MAX, "temperature": 0})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == expected
    r = requests.post(app.url + "/generate", headers=keyed, timeout=120,
                      json={"inputs": "The quick brown", "parameters": {"max_new_tokens": MAX}})
    assert r.status_code == 200 and r.json()["generated_text"] == expected
    r = requests.post(app.url + "/v1/chat/completions", headers=keyed, timeout=120,
                      json={"model": "", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": MAX,
                            "temperature": 0})
    assert r.status_code == 200
    assert r.json()["choices"][0]["message"]["content"] == "<<" + chat_reference(base, "Hello fox", MAX) + ">>"
    # no adapter named: the one the extension picked; an adapter named: the request's choice stands
    routed = "<<" + peft_reference(base, {"A": (setup[1] / "A", 1.0)}, "pirate ship fox", MAX)[0] + ">>"
    r = requests.post(app.url + "/v1/completions", headers=keyed, timeout=120,
                      json={"prompt": "pirate ship", "max_tokens": MAX, "temperature": 0})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == routed
    plain = "<<" + reference_greedy(base, "pirate ship fox", MAX) + ">>"
    r = requests.post(app.url + "/v1/completions", headers=keyed, timeout=120,
                      json={"model": "", "prompt": "pirate ship", "max_tokens": MAX, "temperature": 0})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == plain != routed


def test_login_page_still_works_in_a_browser(app, browser):
    """The gate leaves the login form working: an anonymous page shows it, logging in opens the app."""
    page = browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
    page.goto(app.url)
    page.get_by_label("username").fill(USER)
    page.get_by_label("password").fill(PASSWORD)
    page.get_by_role("button", name="Login").click()
    page.wait_for_selector("#chat-input textarea", timeout=60_000)
    assert page.get_by_role("tab", name="Training").is_visible()
    page.context.close()


def test_binds_loopback_only_by_default(app):
    """Started without --listen-host, the app is not reachable on the machine's other addresses."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))  # UDP: picks the outgoing interface, sends nothing
            address = s.getsockname()[0]
        except OSError:
            address = "127.0.0.1"
    if address.startswith("127."):
        pytest.skip("this machine has no non-loopback IPv4 address")
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://{address}:{app.port}/health", timeout=5)
    assert requests.get(f"http://127.0.0.1:{app.port}/health", timeout=5).ok


def test_ui_outputs_are_not_written_through_links(tmp_path):
    """The names the UI writes under (an export's name, an uploaded file's name) stay plain names inside their
    folder: a symlink already sitting there and pointing out is refused, not written through."""
    from webui.errors import BadInput
    from webui.paths import child

    folder, outside = tmp_path / "models", tmp_path / "outside"
    folder.mkdir()
    outside.mkdir()
    (folder / "trap").symlink_to(outside, target_is_directory=True)
    (folder / "data.jsonl").symlink_to(outside / "data.jsonl")
    assert child(folder, "my-export", "export name") == folder / "my-export"
    for name in ("trap", "data.jsonl", "../x", "a/b", ".hidden", ""):
        with pytest.raises(BadInput):
            child(folder, name)
