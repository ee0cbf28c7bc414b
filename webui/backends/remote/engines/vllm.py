"""vLLM: adapters registered at run time (/v1/load_lora_adapter) under our names, one per request."""
from __future__ import annotations

from pathlib import Path

from webui.backends.remote.engines.base import Dialect
from webui.backends.remote.engines.loradeck import LoraDeck
from webui.backends.remote.http import Http
from webui.errors import BadInput


class VLLM(LoraDeck):
    """vLLM: adapters registered at run time under our names, one per request (`model`)."""

    name = "vllm"
    extra_samplers = ("top_k", "min_p", "repetition_penalty")
    adapter_stack = False
    loads_on_request = True
    load_route = "/v1/load_lora_adapter"
    unload_route = "/v1/unload_lora_adapter"

    def __init__(self, http: Http, adapter_root: str = ""):
        super().__init__(http, adapter_root)
        self.registered: dict[str, str] = {}  # our name -> the path the engine loaded it from, oldest first
        # the most adapters kept registered at once (the managed vLLM: one below its --max-loras, see
        # webui/backends/remote/guard.py); beyond it the least recently registered one is unloaded, and
        # registered again when a request needs it. None: no limit known (an engine started by someone else)
        self.capacity: int | None = None

    def describe(self) -> None:
        Dialect.describe(self)
        if not self.context_length:
            self.context_length = int(self.http.post("/tokenize", {"prompt": " "}).get("max_model_len") or 0)

    def served(self) -> list[str]:
        return [c["id"] for c in self.http.get("/v1/models").get("data", []) if c.get("parent")]

    def prepare(self, name: str, folder: Path) -> None:
        path = self.engine_path(folder)
        if self.registered.get(name) == path:
            return
        if name in self.served() and name not in self.registered:
            # started with it (--lora-modules / --lora-paths) or in its own adapters folder: used as it is
            self.registered[name] = path
            return
        self._make_room(keep=name)
        try:
            self.http.post(self.load_route, {"lora_name": name, "lora_path": path})
        except BadInput as e:
            if "already" not in str(e):  # loaded before (by us before a restart of ours, or by its operator)
                raise BadInput(f"the {self.name} engine could not load adapter {name!r} from {path}: {e} "
                               "(--remote-adapter-root tells LoRA Deck where the engine sees our adapters folder)",
                               code="adapter_unreachable") from None
        self.registered[name] = path

    def _make_room(self, keep: str) -> None:
        while self.capacity is not None and len(self.registered) >= self.capacity:
            oldest = next((n for n in self.registered if n != keep), None)
            if oldest is None:
                return
            self.unregister(oldest)

    def ready(self, name: str) -> bool:
        return name in self.registered

    def unregister(self, name: str) -> None:
        """Unload `name` from the engine (it frees its slot); it is registered again on its next use."""
        if self.registered.pop(name, None) is not None:
            try:
                self.http.post(self.unload_route, {"lora_name": name})
            except BadInput:  # already gone (a restarted engine)
                pass

    def forget(self, name: str) -> None:
        self.registered.pop(name, None)

    def select(self, stack: dict) -> dict:
        return Dialect.select(self, stack)
