"""Extensions: hooks run in the listed order and change what they should; params are overridden from the
settings file; a broken extension (import error, a hook that raises) is disabled with a message while the
chat goes on; names cannot leave the extensions folder; lora_router answers with the adapter its trigger
word names (checked against that adapter's greedy output with plain PEFT); prompt_library sets the
system prompt."""
import shutil
import textwrap
from pathlib import Path

import pytest
import yaml

from tests.helpers import ROOT, peft_reference
from webui.engine import UI_STACK, Engine
from webui.errors import BadInput
from webui.extensions import Extensions
from webui.options.config import GenerationParams, ModelSpec
from webui.testing.tiny_models import write_adapter

TRACE = """
calls = []
params = {{"tag": "{tag}"}}

def setup():
    calls.append("setup")

def chat_input_modifier(text, visible_text, state):
    calls.append("chat_input")
    return text + " <" + params["tag"], visible_text

def input_modifier(text, state, is_chat=False):
    calls.append("input")
    return text + ">"

def history_modifier(history):
    calls.append("history")
    return history[-2:]

def state_modifier(state):
    calls.append("state")
    state["temperature"] = {temperature}
    return state

def output_modifier(text, state, is_chat=False):
    calls.append("output")
    return text + "|" + params["tag"]
"""


def make(folder: Path, name: str, source: str) -> None:
    (folder / name).mkdir(parents=True, exist_ok=True)
    (folder / name / "script.py").write_text(textwrap.dedent(source))


@pytest.fixture
def ext_dir(tmp_path):
    folder = tmp_path / "extensions"
    make(folder, "first", TRACE.format(tag="one", temperature=0.3))
    make(folder, "second", TRACE.format(tag="two", temperature=0.9))
    make(folder, "broken_import", "import no_such_module_anywhere\n")
    make(folder, "raises", "def input_modifier(text, state, is_chat=False):\n    raise RuntimeError('boom')\n")
    return folder


def test_hooks_run_in_order_and_change_what_they_should(ext_dir, tmp_path):
    settings = tmp_path / "settings.yaml"
    settings.write_text(yaml.safe_dump({"extension_params": {"second": {"tag": "TWO"}}}))
    ext = Extensions(ext_dir, settings)
    ext.load_all(["first", "second"])
    history = [{"role": "user", "content": f"m{i}"} for i in range(5)]
    messages, params, adapters, state = ext.chat_turn(history, "hi", "be nice", GenerationParams(temperature=0.7))
    first, second = (e.module for e in ext.loaded)
    assert first.calls == ["setup", "chat_input", "input", "history", "state"]
    assert messages[-1]["content"] == "hi <one <TWO>>"  # first's then second's, each in turn
    assert messages[0] == {"role": "system", "content": "be nice"}
    assert messages[1:-1] == history[-2:]  # history trimmed (twice to the last two)
    assert params.temperature == 0.9  # the last state_modifier wins
    assert adapters is None
    assert ext.output("reply", state) == "reply|one|TWO"
    assert second.params["tag"] == "TWO"  # overridden from the settings file


def test_broken_extensions_are_disabled_with_a_message(ext_dir):
    ext = Extensions(ext_dir)
    ext.load_all(["broken_import", "raises", "first"])
    assert [e.enabled for e in ext.loaded] == [False, True, True]
    assert "broken_import" in ext.messages[0] and "ModuleNotFoundError" in ext.messages[0]
    messages, *_ = ext.chat_turn([], "hello", "", GenerationParams())
    assert messages[-1]["content"] == "hello <one>"  # the chat goes on without the raising hook
    assert not ext.loaded[1].enabled and "input_modifier raised RuntimeError: boom" in ext.messages[1]


@pytest.mark.parametrize("name", ["../first", "/etc", "a/b", "..", ""])
def test_names_cannot_escape_the_extensions_folder(ext_dir, name):
    with pytest.raises(BadInput, match="not allowed|escapes"):
        Extensions(ext_dir).script_path(name)
    ext = Extensions(ext_dir)
    ext.load(name)
    assert not ext.loaded[0].enabled


def test_symlink_out_of_the_folder_is_refused(ext_dir, tmp_path):
    outside = tmp_path / "outside"
    make(outside, "evil", "def setup():\n    raise SystemExit('ran')\n")
    (ext_dir / "evil").symlink_to(outside / "evil", target_is_directory=True)
    with pytest.raises(BadInput, match="escapes"):
        Extensions(ext_dir).script_path("evil")


def test_lora_router_answers_with_the_triggered_adapter(tiny_models, tmp_path):
    base = tiny_models["llama"]
    loras = tmp_path / "loras"
    write_adapter(base, loras / "pirate", target_modules=["q_proj", "v_proj"], seed=21)
    write_adapter(base, loras / "sql", target_modules="all-linear", r=8, seed=22)
    settings = tmp_path / "settings.yaml"
    settings.write_text(yaml.safe_dump({"extension_params": {"lora_router": {
        "routes": {"pirate": ["arr", "matey"], "sql": ["query"]}}}}))
    ext = Extensions(ROOT / "extensions", settings)
    ext.load_all(["lora_router"])
    engine = Engine(base.parent, loras)
    engine.load(ModelSpec(model="tiny-llama"))
    greedy = GenerationParams(temperature=0, max_new_tokens=10)

    def answer(text):
        messages, params, adapters, state = ext.chat_turn([], text, "", greedy)
        prompt = engine.chat_prompt(messages)
        if adapters:
            engine.prepare_adapters(list(adapters))
        # as the Chat tab does: an extension that picked no adapters (None) leaves the UI's stack answering
        stack = UI_STACK if adapters is None else adapters
        return prompt, adapters, state, engine.submit(prompt, params, stack).text()

    for text, adapter in (("Arr, where is the treasure?", "pirate"), ("Write a QUERY for users", "sql")):
        prompt, adapters, state, reply = answer(text)
        assert adapters == {adapter: 1.0} and adapter in state["note"]
        assert reply == peft_reference(base, {adapter: (loras / adapter, 1.0)}, prompt, 10)[0]
    prompt, adapters, state, reply = answer("Hello there")  # no trigger: the app's active adapters
    assert adapters is None and "note" not in state
    assert reply == engine.generate(prompt, greedy)
    assert engine.active_adapters == {}  # routing never changed the app's own stack


def test_prompt_library_sets_the_system_prompt(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(ROOT / "extensions" / "prompt_library", tmp_path / "extensions" / "prompt_library")
    ext = Extensions(tmp_path / "extensions")
    ext.load_all(["prompt_library"])
    lib = ext.loaded[0].module
    lib.params["active"] = "Concise"
    messages, *_ = ext.chat_turn([], "What is 2+2?", "Use French.", GenerationParams())
    assert messages[0]["content"] == lib.STARTER["Concise"] + "\n\nUse French."
    lib.save_library({"Pirate": "Talk like a pirate."})
    lib.params["active"] = "Pirate"
    assert ext.chat_turn([], "hi", "", GenerationParams())[0][0]["content"] == "Talk like a pirate."


def test_app_with_broken_extension_keeps_answering(browser, start_app, tiny_models, tmp_path):
    from tests.browser import open_app, send, wait_text

    folder = tmp_path / "extensions"
    make(folder, "broken_import", "import no_such_module_anywhere\n")
    make(folder, "shout", "def output_modifier(text, state, is_chat=False):\n    return 'SHOUT ' + text\n")
    app = start_app("--model", "tiny-llama", "--models-dir", str(tiny_models["llama"].parent),
                    "--extensions", "broken_import", "shout", "--extensions-dir", str(folder),
                    "--user-dir", str(tmp_path / "user"))
    assert "extension broken_import was disabled" in app.output()
    page = open_app(browser, app.url)
    assert "broken_import was disabled" in page.inner_text("#extensions-messages")
    send(page, "Hello")
    reply = wait_text(lambda: page.locator("#chatbot [data-testid=bot]").first.inner_text()
                      if page.locator("#chatbot [data-testid=bot]").count() else "", timeout=60)
    assert reply.startswith("SHOUT")  # the healthy extension still runs; the chat answers
