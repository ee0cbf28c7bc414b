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
(webui/backends/remote/http.py).
"""
from __future__ import annotations

from webui.backends.remote.engines.base import ChatPrompt, Dialect
from webui.backends.remote.engines.llama_server import LlamaServer
from webui.backends.remote.engines.loradeck import LoraDeck
from webui.backends.remote.engines.lorax import LoRAX
from webui.backends.remote.engines.sglang import SGLang
from webui.backends.remote.engines.vllm import VLLM
from webui.backends.remote.http import Http
from webui.errors import EngineUnavailable

__all__ = ["ENGINES", "ChatPrompt", "Dialect", "LlamaServer", "LoRAX", "LoraDeck", "SGLang", "VLLM", "detect"]


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
