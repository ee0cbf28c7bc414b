"""What every engine's dialect shares: the plain OpenAI-compatible one (`Dialect`), which the others
extend, and the chat prompt that travels to an engine's own chat route (`ChatPrompt`)."""
from __future__ import annotations

import json
from pathlib import Path

from webui.backends.remote.http import Http
from webui.errors import EngineUnavailable, Unsupported
from webui.options.config import GenerationParams


class ChatPrompt(str):
    """A chat whose messages travel to the engine's own chat route, so the reply is exactly the engine's chat
    answer: its chat route is not always its completions route on the rendered template (llama-server replaces
    invalid UTF-8 in a chat reply over the whole text, but token by token in a completion; vLLM adds a second
    BOS to a rendered template sent as a completion). The string value is the template rendered by the engine
    where it can (token counts, context checks, /tokenize), else the messages' JSON (rough counts)."""

    messages: list[dict]

    def __new__(cls, messages: list[dict], rendered: str | None = None):
        obj = super().__new__(cls, json.dumps(messages, ensure_ascii=False) if rendered is None else rendered)
        obj.messages = messages
        return obj


def _response_format(params: GenerationParams) -> dict | None:
    if not params.response_format:
        return None
    if params.response_format == "json":
        return {"type": "json_object"}
    return {"type": "json_schema", "json_schema": {"name": "reply", "schema": json.loads(params.response_format)}}


PROBE_CHAT = [{"role": "user", "content": "Say one word."}]


class Dialect:
    """An OpenAI-compatible engine; subclasses add what their engine has beyond that."""

    name = "openai"
    # GenerationParams fields beyond OpenAI's own that the engine's completions route honours
    extra_samplers: tuple = ()
    response_format = True
    adapter_stack = False   # several adapters with weights in one request
    renders_chat = False    # a route that renders its chat template (the prompt's text; chats go to its chat route)
    tokenizes = False

    def __init__(self, http: Http, adapter_root: str = ""):
        self.http, self.adapter_root = http, adapter_root
        self.base = ""
        self.context_length = 0
        self.folders: dict[str, Path] = {}  # our adapters the engine can use -> their folders here

    # -- the engine ----------------------------------------------------------------------------------
    def describe(self) -> None:
        """Read the base model's name and context length from the engine."""
        cards = self.http.get("/v1/models").get("data") or []
        if not cards:
            raise EngineUnavailable(f"the engine at {self.http.url} lists no model", status=502)
        base = next((c for c in cards if not c.get("parent") and c.get("kind", "base") == "base"), cards[0])
        self.base = base["id"]
        self.context_length = int(base.get("max_model_len") or 0)

    def samplers(self) -> frozenset:
        return frozenset({"max_new_tokens", "temperature", "top_p", "presence_penalty", "frequency_penalty", "seed",
                          "stop", *self.extra_samplers, *(("response_format",) if self.response_format else ())})

    # -- text ------------------------------------------------------------------------------------------
    def chat_prompt(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        return ChatPrompt(messages)

    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        raise Unsupported(f"the {self.name} engine has no tokenizer route")

    def detokenize(self, ids: list[int]) -> str:
        raise Unsupported(f"the {self.name} engine has no tokenizer route")

    # -- adapters --------------------------------------------------------------------------------------
    def served(self) -> list[str]:
        """The adapter names the engine serves right now."""
        return []

    # the engine loads adapters at run time (vLLM, SGLang: registered by us; LoRAX: on a request naming them)
    loads_on_request = False

    def serving(self, ours: dict) -> list[str]:
        """Which of our adapters (name -> folder) the engine serves now (the Model tab's list)."""
        have = set(self.served())
        return [name for name in ours if name in have]

    def prepare(self, name: str, folder: Path) -> None:
        """Make our adapter `name` (files in `folder`) usable on the engine, or refuse with the reason."""
        raise Unsupported(f"the {self.name} engine cannot load LoRA adapters through LoRA Deck")

    def forget(self, name: str) -> None:
        """`name` is no longer cached here (its files changed or it was deleted)."""

    def ready(self, name: str) -> bool:
        """Is `name` usable on the engine now (False: `prepare` it again before a request names it)?"""
        return True

    def unregister(self, name: str) -> None:
        """Take `name` off the engine where it can be (vLLM, SGLang); else only forget it here."""
        self.forget(name)

    def engine_path(self, folder: Path) -> str:
        """Our adapter folder as the engine sees it (--remote-adapter-root maps loras/NAME to ROOT/NAME)."""
        return str(Path(self.adapter_root) / folder.name) if self.adapter_root else str(Path(folder).resolve())

    # -- generation ------------------------------------------------------------------------------------
    def sampling(self, params: GenerationParams) -> dict:
        body = {"max_tokens": params.max_new_tokens, "temperature": params.temperature, "top_p": params.top_p,
                "presence_penalty": params.presence_penalty, "frequency_penalty": params.frequency_penalty}
        if params.seed >= 0:
            body["seed"] = params.seed
        if params.stop:
            body["stop"] = list(params.stop)
        for name in self.extra_samplers:
            body[name] = getattr(params, name)
        if self.response_format and params.response_format:
            body["response_format"] = _response_format(params)
        return body

    def takes_stack(self, prompt=None) -> bool:
        """Whether a request (for `prompt`; None: any) can carry a weighted stack; if not, the remote backend sends
        the stack blended into one adapter."""
        return self.adapter_stack

    def select(self, stack: dict) -> dict:
        """The request fields that select `stack` ({} = the plain base)."""
        if not stack:
            return {"model": self.base}
        if len(stack) > 1 or next(iter(stack.values())) != 1.0:
            raise Unsupported(f"the {self.name} engine serves one adapter at weight 1 per request; blend the "
                              "stack into one adapter first (python -m webui blend) and select that")
        return {"model": next(iter(stack))}

    def request(self, prompt: str, params: GenerationParams, stack: dict) -> tuple[str, dict]:
        """(route, body) of a streamed completion of `prompt` under `stack`."""
        body = {**self.sampling(params), **self.select(stack), "stream": True,
                "stream_options": {"include_usage": True}}
        if isinstance(prompt, ChatPrompt):
            return "/v1/chat/completions", {**body, "messages": prompt.messages}
        return "/v1/completions", {**body, "prompt": str(prompt)}

    scores = False  # the engine gives prompt log-probabilities (`score`): evaluation and logprobs work there

    def score(self, ids: list[int], top_k: int, stack: dict):
        raise Unsupported(f"the {self.name} engine gives no prompt log-probabilities through LoRA Deck")

    def probe(self, stack: dict, max_tokens: int = 1) -> list[tuple[str, float]] | None:
        """The top-5 log-probabilities of the first reply token to a fixed chat under `stack`, greedy (the silent
        no-op guard, webui/backends/remote/guard.py); None when the engine gives none."""
        body = {**self.select(stack), "messages": PROBE_CHAT, "max_tokens": max_tokens, "temperature": 0.0,
                "logprobs": True, "top_logprobs": 5}
        answer = self.http.post("/v1/chat/completions", body)
        choice = (answer.get("choices") or [{}])[0] if isinstance(answer, dict) else {}
        content = (choice.get("logprobs") or {}).get("content") or []
        top = content[0].get("top_logprobs") if content else None
        return [(t["token"], float(t["logprob"])) for t in top] if top else None

    def parse(self, event: dict) -> tuple[str, str | None, int | None]:
        """(text, finish reason or None, completion tokens or None) of one streamed event."""
        usage = event.get("usage") or {}
        choices = event.get("choices") or [{}]
        choice = choices[0]
        text = choice.get("text")
        if text is None:
            text = (choice.get("delta") or {}).get("content")
        return text or "", choice.get("finish_reason"), usage.get("completion_tokens")
