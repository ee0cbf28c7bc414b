"""Extensions: `extensions/NAME/script.py` modules with text-generation-webui's familiar hooks, loaded for
the names given with `--extensions` or ticked in the UI (saved in user_data/settings.yaml).

Hooks, each optional, called in the order the extensions are listed:
  setup()                                    once, after loading
  ui()                                       builds Gradio components in the Chat tab's Extensions area
  chat_input_modifier(text, visible_text, state) -> (text, visible_text)
  input_modifier(text, state, is_chat) -> text
  history_modifier(history) -> history       OpenAI-style messages before the new one
  state_modifier(state) -> state             sampling parameters (GenerationParams fields), plus
                                             state["adapters"] ({name: weight} for this message, None =
                                             the app's active adapters) and state["system"]
  output_modifier(text, state, is_chat) -> text
and a module-level `params` dict whose values the user can override in user_data/settings.yaml under
`extension_params: {NAME: {key: value}}`. An extension whose import or hook raises is disabled, with a
message for the page and the log; the chat goes on without it. Names resolve only inside the folder.
The same loaded extensions run on API requests too (webui/api/service.py, Service.apply_input): every hook but
setup/ui, except output_modifier on streamed replies (their text is sent as it is generated).
"""
from __future__ import annotations

import importlib.util
import logging
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from webui.errors import BadInput, NotFound
from webui.options.config import GenerationParams
from webui.paths import inside

log = logging.getLogger(__name__)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]{0,63}$")
HOOKS = ("setup", "ui", "chat_input_modifier", "input_modifier", "history_modifier", "state_modifier",
         "output_modifier")


@dataclass
class Extension:
    name: str
    module: object = None
    enabled: bool = True
    error: str = ""

    @property
    def params(self) -> dict:
        return getattr(self.module, "params", {}) if self.module else {}


@dataclass
class Extensions:
    folder: Path
    settings_file: Path | None = None
    loaded: list[Extension] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)  # what was disabled and why, for the page

    # -- discovery and loading --------------------------------------------------------------------------
    def available(self) -> list[str]:
        if not Path(self.folder).is_dir():
            return []
        return sorted(p.name for p in Path(self.folder).iterdir() if (p / "script.py").is_file() and _NAME.match(p.name))

    def script_path(self, name: str) -> Path:
        if not _NAME.match(name or ""):
            raise BadInput(f"extension name {name!r} is not allowed (a folder name inside {self.folder})")
        path = Path(self.folder) / name / "script.py"
        if not inside(self.folder, path):
            raise BadInput(f"extension {name!r} escapes the extensions folder {self.folder}")
        if not path.is_file():
            raise NotFound(f"extension {name!r} not found: no {self.folder}/{name}/script.py")
        return path

    def settings(self) -> dict:
        if self.settings_file and Path(self.settings_file).is_file():
            try:
                return yaml.safe_load(Path(self.settings_file).read_text()) or {}
            except yaml.YAMLError as e:
                log.warning("ignoring %s: %s", self.settings_file, e)
        return {}

    def save_enabled(self, names: list[str]) -> None:
        if not self.settings_file:
            return
        data = self.settings()
        data["extensions"] = list(names)
        Path(self.settings_file).parent.mkdir(parents=True, exist_ok=True)
        Path(self.settings_file).write_text(yaml.safe_dump(data, sort_keys=False))

    def load_all(self, names: list[str]) -> None:
        for name in names:
            if not any(e.name == name for e in self.loaded):
                self.load(name)

    def load(self, name: str) -> Extension:
        """Import and set up one extension; a failure leaves it listed as disabled with the reason."""
        ext = Extension(name)
        self.loaded.append(ext)
        try:
            path = self.script_path(name)
            spec = importlib.util.spec_from_file_location(f"lora_deck_extension_{name}", path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module
            spec.loader.exec_module(module)
            ext.module = module
        except Exception as e:  # an import error in a user's script must not stop the app
            self._disable(ext, "import", e)
            return ext
        overrides = (self.settings().get("extension_params") or {}).get(name) or {}
        if isinstance(getattr(module, "params", None), dict) and isinstance(overrides, dict):
            module.params.update(overrides)
        self.call(ext, "setup")
        return ext

    def unload(self, name: str) -> None:
        self.loaded = [e for e in self.loaded if e.name != name]

    def _disable(self, ext: Extension, hook: str, e: BaseException) -> None:
        ext.enabled = False
        ext.error = f"extension {ext.name} was disabled: {hook} raised {type(e).__name__}: {e}"
        self.messages.append(ext.error)
        log.error("%s", ext.error, exc_info=(type(e), e, e.__traceback__))

    # -- calling hooks ----------------------------------------------------------------------------------
    def call(self, ext: Extension, hook: str, *args, default=None, **kwargs):
        fn = getattr(ext.module, hook, None) if ext.enabled and ext.module else None
        if fn is None:
            return default
        try:
            result = fn(*args, **kwargs)
        except Exception as e:
            self._disable(ext, hook, e)
            return default
        return default if result is None else result  # a hook that returns nothing changes nothing

    def active(self) -> list[Extension]:
        return [e for e in self.loaded if e.enabled]

    def chat_input(self, text: str, visible: str, state: dict) -> tuple[str, str]:
        for ext in self.active():
            text, visible = self.call(ext, "chat_input_modifier", text, visible, state, default=(text, visible))
        for ext in self.active():
            text = self.call(ext, "input_modifier", text, state, is_chat=True, default=text)
        return text, visible

    def history(self, history: list[dict]) -> list[dict]:
        for ext in self.active():
            history = self.call(ext, "history_modifier", history, default=history)
        return history

    def state(self, state: dict) -> dict:
        for ext in self.active():
            state = self.call(ext, "state_modifier", state, default=state)
        return state

    def text_input(self, text: str, state: dict) -> str:
        """A raw prompt (no chat template: /v1/completions, LoRAX) through input_modifier with is_chat=False."""
        for ext in self.active():
            text = self.call(ext, "input_modifier", text, state, is_chat=False, default=text)
        return text

    def output(self, text: str, state: dict, is_chat: bool = True) -> str:
        for ext in self.active():
            text = self.call(ext, "output_modifier", text, state, is_chat=is_chat, default=text)
        return text

    def chat_turn(self, previous: list[dict], user_text: str, system: str, params):
        """One chat message through the hooks: (messages for the model, GenerationParams, adapters for this
        reply or None for the app's active ones, the final state)."""
        state = {**params.to_dict(), "adapters": None, "system": system or ""}
        text, _visible = self.chat_input(user_text, user_text, state)
        prior = self.history(previous)
        state = self.state(state)
        fields = {k: v for k, v in state.items() if k in GenerationParams.__dataclass_fields__}
        sys_text = (state.get("system") or "").strip()
        messages = ([{"role": "system", "content": sys_text}] if sys_text else []) + list(prior) + \
            [{"role": "user", "content": text}]
        return messages, GenerationParams.from_dict(fields), state.get("adapters"), state
