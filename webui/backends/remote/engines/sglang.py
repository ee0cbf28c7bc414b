"""SGLang: vLLM's way of registering adapters (at /load_lora_adapter), `model: BASE:ADAPTER` per request."""
from __future__ import annotations

from webui.backends.remote.engines.base import Dialect
from webui.backends.remote.engines.vllm import VLLM


class SGLang(VLLM):
    """SGLang: /load_lora_adapter, and `model: BASE:ADAPTER` on requests."""

    name = "sglang"
    load_route = "/load_lora_adapter"
    unload_route = "/unload_lora_adapter"
    scores = False  # vLLM's prompt_logprobs is not SGLang's (it has its own fields; not run here)

    def select(self, stack: dict) -> dict:
        chosen = Dialect.select(self, stack)
        return chosen if not stack else {"model": f"{self.base}:{chosen['model']}"}
