"""vLLM: adapters registered at run time (/v1/load_lora_adapter) under our names, one per request.

vLLM gives every registration an adapter slot (`--max-loras` of them) that it keeps until another registration
needs it: /v1/unload_lora_adapter only forgets the name. Once every slot holds an adapter, vLLM's CPU build
(0.32.0) applies the last slot's adapter to base rows batched with adapter rows (webui/backends/remote/guard.py
catches it). Where the slot count is known (the managed vllm loader) `capacity` keeps the last slot empty.
"""
from __future__ import annotations

from pathlib import Path

from webui.backends.base import TokenScores
from webui.backends.remote.engines.base import Dialect
from webui.backends.remote.engines.loradeck import LoraDeck
from webui.backends.remote.http import Http
from webui.errors import BadInput, EngineUnavailable, Unsupported


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
        self.registered: dict[str, str] = {}  # our name -> the path the engine loaded it from
        # registrations the engine has room for before its last slot fills (the managed vLLM: --max-loras - 1);
        # None: not known (an engine started by someone else: the guard watches it instead)
        self.capacity: int | None = None
        self.registrations = 0  # since the engine started: each one holds a slot

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
        if self.capacity is not None and self.registrations >= self.capacity:
            raise Unsupported(f"the managed {self.name} engine has used the {self.capacity} adapter slots it was "
                              f"started with, and vLLM frees a slot only when it restarts (with every slot full, its "
                              f"CPU build answers base requests with an adapter): load the model again to restart "
                              f"it, with a larger engine_max_loras to hold more adapters", code="engine_slots_full")
        try:
            self.http.post(self.load_route, {"lora_name": name, "lora_path": path})
        except BadInput as e:
            if "already" not in str(e):  # loaded before (by us before a restart of ours, or by its operator)
                raise BadInput(f"the {self.name} engine could not load adapter {name!r} from {path}: {e} "
                               "(--remote-adapter-root tells LoRA Deck where the engine sees our adapters folder)",
                               code="adapter_unreachable") from None
        self.registrations += 1
        self.registered[name] = path

    def ready(self, name: str) -> bool:
        return name in self.registered

    def unregister(self, name: str) -> None:
        """Take `name` off the engine's list (its slot stays taken until vLLM needs it for another adapter)."""
        if self.registered.pop(name, None) is not None:
            try:
                self.http.post(self.unload_route, {"lora_name": name})
            except BadInput:  # already gone (a restarted engine)
                pass

    def forget(self, name: str) -> None:
        self.registered.pop(name, None)

    def select(self, stack: dict) -> dict:
        return Dialect.select(self, stack)

    scores = True  # prompt log-probabilities (evaluation, logprobs/echo through our API)

    def score(self, ids: list[int], top_k: int, stack: dict) -> TokenScores:
        """One sequence's per-token log-probabilities under `stack`: vLLM's `prompt_logprobs` on a token-id prompt,
        each position's entry holding the prompt token and the top-k (token ids as keys)."""
        body = {**self.select(stack), "prompt": list(ids), "max_tokens": 1, "temperature": 0.0,
                "prompt_logprobs": top_k}
        entries = (self.http.post("/v1/completions", body).get("choices") or [{}])[0].get("prompt_logprobs") or []
        if len(entries) != len(ids):
            raise EngineUnavailable(f"the vllm engine gave {len(entries)} prompt log-probabilities for {len(ids)} "
                                    "tokens", status=502)
        picked, top = [], []
        for token, entry in zip(ids[1:], entries[1:]):  # the first token has no context
            picked.append(float(entry[str(token)]["logprob"]))
            ranked = sorted(((int(t), float(v["logprob"])) for t, v in entry.items()), key=lambda tv: -tv[1])
            top.append(ranked[:top_k])
        return TokenScores(list(ids), picked, top if top_k else None)
