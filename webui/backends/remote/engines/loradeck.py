"""Another LoRA Deck as the engine: its own `model` / `adapters` fields select a stack."""
from __future__ import annotations

from pathlib import Path

from webui.backends.remote.engines.base import ChatPrompt, Dialect
from webui.errors import Unsupported


class LoraDeck(Dialect):
    """Another LoRA Deck: `model` / `adapters` select a stack; /tokenize and /detokenize (vLLM's shape) render the
    chat template and count tokens."""

    name = "loradeck"
    extra_samplers = ("top_k", "min_p", "typical_p", "repetition_penalty")
    adapter_stack = renders_chat = tokenizes = True

    def describe(self) -> None:
        super().describe()
        self.context_length = int(self.http.post("/tokenize", {"prompt": " "}).get("max_model_len") or 0)

    def chat_prompt(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        # the engine's own template, rendered there; its text is what its chat route would generate from
        ids = self.http.post("/tokenize", {"messages": messages, "add_special_tokens": False,
                                           "add_generation_prompt": add_generation_prompt})["tokens"]
        rendered = self.detokenize(ids)
        # a turn to answer goes to the chat route; an open turn (continue) is completed as text
        return ChatPrompt(messages, rendered) if add_generation_prompt else rendered

    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        return list(self.http.post("/tokenize", {"prompt": text, "add_special_tokens": add_special})["tokens"])

    def detokenize(self, ids: list[int]) -> str:
        return self.http.post("/detokenize", {"tokens": list(ids)})["prompt"]

    def served(self) -> list[str]:
        return [c["id"] for c in self.http.get("/v1/models").get("data", []) if c.get("parent")]

    def prepare(self, name: str, folder: Path) -> None:
        have = self.served()
        if name not in have:
            raise Unsupported(f"the LoRA Deck at {self.http.url} has no adapter {name!r} (it serves: "
                              f"{', '.join(have) or 'none'}); copy the adapter into its adapters folder")

    def select(self, stack: dict) -> dict:
        if not stack:
            return {"model": self.base}
        if len(stack) == 1 and next(iter(stack.values())) == 1.0:
            return {"model": next(iter(stack))}
        return {"model": "", "adapters": [{"name": n, "weight": w} for n, w in stack.items()]}
