"""The serving engines the remote loader drives, each in its own HTTP dialect: LoRA Deck, vLLM, SGLang, LoRAX,
llama.cpp's llama-server and any OpenAI-compatible server. A dialect knows how to name the engine's base
model and context, send a chat to the engine's own chat route (so a chat through LoRA Deck gives the same
answer as the same chat sent straight to the engine; the template is rendered by the engine where it can, for
token counts), tokenize, which sampling fields the engine honours, and how a request selects adapters in the engine's terms:

- LoRA Deck: its own `model` (one adapter) / `adapters` (a weighted stack) fields;
- vLLM / SGLang: adapters registered at run time (/v1/load_lora_adapter, /load_lora_adapter) with a path the
  engine can read (--remote-adapter-root), selected with `model` (SGLang: BASE:ADAPTER); one per request;
- LoRAX: `adapter_id` + `adapter_source: local`, and `merged_adapters` (linear) for a weighted stack;
- llama-server: the adapters it was started with (--lora a.gguf,b.gguf), matched to ours by file name,
  selected per request with `lora: [{id, scale}]` (stacks included).
`detect` picks the dialect from the routes an engine answers; the connection is `Http`
(webui/backends/remote_http.py).
"""
from __future__ import annotations

import json
from pathlib import Path

from webui.backends.remote_http import Http
from webui.config import GenerationParams
from webui.errors import BadInput, EngineUnavailable, Unsupported


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

    def parse(self, event: dict) -> tuple[str, str | None, int | None]:
        """(text, finish reason or None, completion tokens or None) of one streamed event."""
        usage = event.get("usage") or {}
        choices = event.get("choices") or [{}]
        choice = choices[0]
        text = choice.get("text")
        if text is None:
            text = (choice.get("delta") or {}).get("content")
        return text or "", choice.get("finish_reason"), usage.get("completion_tokens")


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


class SGLang(VLLM):
    """SGLang: /load_lora_adapter, and `model: BASE:ADAPTER` on requests."""

    name = "sglang"
    load_route = "/load_lora_adapter"

    def select(self, stack: dict) -> dict:
        chosen = Dialect.select(self, stack)
        return chosen if not stack else {"model": f"{self.base}:{chosen['model']}"}


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


ENGINES = {d.name: d for d in (LoraDeck, VLLM, SGLang, LoRAX, LlamaServer, Dialect)}


def detect(http: Http) -> type[Dialect]:
    """Which engine answers at the URL, from routes only it has: /v1/adapters (LoRA Deck), /lora-adapters
    (llama-server), /get_model_info (SGLang), /info (LoRAX), /version (vLLM); else plain OpenAI."""
    for route, dialect in (("/v1/adapters", LoraDeck), ("/lora-adapters", LlamaServer), ("/get_model_info", SGLang),
                           ("/info", LoRAX), ("/version", VLLM)):
        if http.answers(route):
            return dialect
    if http.answers("/v1/models"):
        return Dialect
    raise EngineUnavailable(f"no serving engine answers at {http.url} (tried /v1/adapters, /lora-adapters, "
                            "/get_model_info, /info, /version, /v1/models)")
