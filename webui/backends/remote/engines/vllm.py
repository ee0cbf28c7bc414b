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

    def __init__(self, http: Http, adapter_root: str = ""):
        super().__init__(http, adapter_root)
        self.registered: dict[str, str] = {}  # our name -> the path the engine loaded it from

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
        try:
            self.http.post(self.load_route, {"lora_name": name, "lora_path": path})
        except BadInput as e:
            if "already" not in str(e):  # loaded before (by us before a restart of ours, or by its operator)
                raise BadInput(f"the {self.name} engine could not load adapter {name!r} from {path}: {e} "
                               "(--remote-adapter-root tells LoRA Deck where the engine sees our adapters folder)",
                               code="adapter_unreachable") from None
        self.registered[name] = path

    def forget(self, name: str) -> None:
        self.registered.pop(name, None)

    def select(self, stack: dict) -> dict:
        return Dialect.select(self, stack)
