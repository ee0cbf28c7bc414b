"""llama.cpp's llama-server: the adapters it was started with, matched to ours by file name, with
per-request `lora` scales."""
from __future__ import annotations

from pathlib import Path

from webui.backends.remote.engines.base import ChatPrompt, Dialect
from webui.backends.remote.http import Http
from webui.errors import Unsupported
from webui.options.config import GenerationParams


class LlamaServer(Dialect):
    """llama.cpp's llama-server: adapters fixed at its start, per-request `lora` scales, /apply-template."""

    name = "llama-server"
    extra_samplers = ("top_k", "min_p", "typical_p")
    response_format = False
    adapter_stack = renders_chat = tokenizes = True

    def __init__(self, http: Http, adapter_root: str = ""):
        super().__init__(http, adapter_root)
        self.table: list[dict] | None = None  # GET /lora-adapters, re-read after the engine failed
        self.ids: dict[str, int] = {}         # our name -> the engine's adapter id

    def describe(self) -> None:
        props = self.http.get("/props")
        settings = props.get("default_generation_settings") or {}
        self.context_length = int(settings.get("n_ctx") or props.get("n_ctx") or 0)
        cards = self.http.get("/v1/models").get("data") or []
        self.base = Path(cards[0]["id"] if cards else props.get("model_path", "llama-server")).name
        self.table = None

    def adapters(self) -> list[dict]:
        if self.table is None:
            self.table = self.http.get("/lora-adapters")
        return self.table

    def samplers(self) -> frozenset:
        return super().samplers() | {"repetition_penalty"}

    def sampling(self, params: GenerationParams) -> dict:
        return {**super().sampling(params), "repeat_penalty": params.repetition_penalty}

    def chat_prompt(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        rendered = self.http.post("/apply-template", {"messages": messages})["prompt"]
        return ChatPrompt(messages, rendered) if add_generation_prompt else rendered

    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        return list(self.http.post("/tokenize", {"content": text, "add_special": add_special,
                                                 "parse_special": True})["tokens"])

    def detokenize(self, ids: list[int]) -> str:
        return self.http.post("/detokenize", {"tokens": list(ids)})["content"]

    @staticmethod
    def matches(name: str, folder: Path, engine_path: str) -> bool:
        """Is the engine's adapter file ours? The file is named after the adapter (A.gguf), lies in the adapter's
        folder (loras/A/adapter....gguf, our cached conversion), or is a GGUF file of that folder."""
        file = Path(engine_path)
        return file.stem == name or file.parent.name == name or (Path(folder) / file.name).is_file()

    def served(self) -> list[str]:
        return [Path(a["path"]).stem for a in self.adapters()]

    def serving(self, ours: dict) -> list[str]:
        return [name for name, folder in ours.items()
                if any(self.matches(name, Path(folder), entry["path"]) for entry in self.adapters())]

    def prepare(self, name: str, folder: Path) -> None:
        for entry in self.adapters():
            if self.matches(name, folder, entry["path"]):
                self.ids[name] = int(entry["id"])
                return
        have = ", ".join(Path(a["path"]).name for a in self.adapters()) or "none"
        raise Unsupported(f"llama-server was not started with adapter {name!r} (it has: {have}); it cannot load "
                          "adapters at run time: restart it with the command `python -m webui llama-server-command` "
                          "prints", code="adapter_unreachable")

    def select(self, stack: dict) -> dict:
        # every adapter listed: an id left out would keep its global scale (POST /lora-adapters)
        scales = {i: 0.0 for i in range(len(self.adapters()))}
        for name, weight in stack.items():
            scales[self.ids[name]] = float(weight)
        return {"model": self.base, "lora": [{"id": i, "scale": s} for i, s in scales.items()]}
