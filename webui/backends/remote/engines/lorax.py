"""LoRAX: `adapter_id` + `adapter_source: local`, and `merged_adapters` (linear) for a weighted stack."""
from __future__ import annotations

from pathlib import Path

from webui.backends.remote.engines.base import PROBE_CHAT, ChatPrompt, Dialect
from webui.errors import Unsupported
from webui.options.config import GenerationParams


class LoRAX(Dialect):
    """LoRAX: /generate_stream with adapter_id + adapter_source (local: a path it can read) and merged_adapters."""

    name = "lorax"
    extra_samplers = ("top_k", "typical_p", "repetition_penalty")
    response_format = False
    adapter_stack = tokenizes = False
    loads_on_request = True

    def describe(self) -> None:
        info = self.http.get("/info")
        self.base = str(info.get("model_id") or "lorax")
        self.context_length = int(info.get("max_total_tokens") or 0)

    def samplers(self) -> frozenset:
        return frozenset({"max_new_tokens", "temperature", "top_p", "top_k", "typical_p", "repetition_penalty",
                          "seed", "stop"})

    def prepare(self, name: str, folder: Path) -> None:
        """LoRAX loads an adapter on its first request; nothing to register."""

    def takes_stack(self, prompt=None) -> bool:
        return not isinstance(prompt, ChatPrompt)  # merged_adapters on /generate; its chat route takes one

    def request(self, prompt: str, params: GenerationParams, stack: dict) -> tuple[str, dict]:
        if isinstance(prompt, ChatPrompt):  # its OpenAI chat route: one adapter through `model`
            return super().request(prompt, params, stack)
        parameters: dict = {"max_new_tokens": params.max_new_tokens, "stop": list(params.stop),
                            "details": True}
        if not params.greedy:  # LoRAX samples only when asked to; any sampling field counts as asking
            parameters.update(do_sample=True, temperature=params.temperature, top_p=params.top_p,
                              repetition_penalty=params.repetition_penalty)
            if params.top_k:
                parameters["top_k"] = params.top_k
            if params.typical_p < 1:
                parameters["typical_p"] = params.typical_p
        elif params.repetition_penalty != 1.0:
            parameters["repetition_penalty"] = params.repetition_penalty
        if params.seed >= 0:
            parameters["seed"] = params.seed
        parameters.update(self._adapters(stack))
        return "/generate_stream", {"inputs": str(prompt), "parameters": parameters}

    def probe(self, stack: dict, max_tokens: int = 1) -> list[tuple[str, float]] | None:
        """The guard's probe on /generate, where a stack and log-probabilities are LoRAX's own (details with
        return_k_alternatives); its chat route takes one adapter."""
        parameters = {"max_new_tokens": max_tokens, "details": True, "return_k_alternatives": 5,
                      **self._adapters(stack)}
        answer = self.http.post("/generate", {"inputs": PROBE_CHAT[0]["content"], "parameters": parameters})
        answer = answer[0] if isinstance(answer, list) and answer else answer
        tokens = ((answer or {}).get("details") or {}).get("tokens") or [] if isinstance(answer, dict) else []
        top = tokens[0].get("alternative_tokens") if tokens else None
        return sorted(((t["text"], float(t["logprob"])) for t in top), key=lambda t: -t[1]) if top else None

    def _adapters(self, stack: dict) -> dict:
        if not stack:
            return {}
        paths = {n: self.engine_path(self.folders[n]) for n in stack}
        if len(stack) == 1 and next(iter(stack.values())) == 1.0:
            return {"adapter_id": paths[next(iter(stack))], "adapter_source": "local"}
        return {"adapter_source": "local", "merged_adapters": {
            "ids": [paths[n] for n in stack], "weights": [float(w) for w in stack.values()],
            "merge_strategy": "linear"}}

    def select(self, stack: dict) -> dict:
        if not stack:
            return {"model": self.base}
        if len(stack) > 1 or next(iter(stack.values())) != 1.0:
            raise Unsupported("LoRAX's chat route takes one adapter; send a weighted stack (merged_adapters) "
                              "as a completion")
        name = next(iter(stack))
        return {"model": self.engine_path(self.folders[name]), "adapter_source": "local"}

    def parse(self, event: dict) -> tuple[str, str | None, int | None]:
        if "choices" in event:
            return super().parse(event)
        token = event.get("token") or {}
        text = "" if token.get("special") else token.get("text", "")
        details = event.get("details") or {}
        reason = details.get("finish_reason")
        finish = None if reason is None else "length" if reason == "length" else "stop"
        return text, finish, details.get("generated_tokens")
