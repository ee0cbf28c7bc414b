"""vLLM's dialect beside OpenAI's: adapters loaded and unloaded at run time under a name of the client's
choosing (`POST /v1/load_lora_adapter {"lora_name", "lora_path"}`, `POST /v1/unload_lora_adapter
{"lora_name"}`; the path must lie inside the adapters folder), then `model: lora_name` on any request; and
`POST /tokenize` / `POST /detokenize` in vLLM's shapes. The adapter is checked against the loaded base
when it is loaded, so a misfit is refused there, not on the first request.
"""
from __future__ import annotations

from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, ConfigDict
from starlette.concurrency import run_in_threadpool

from webui.adapters.files import locate_adapter
from webui.api.schemas import ChatMessage
from webui.api.service import Service
from webui.errors import BadInput, NotFound


class LoadLora(BaseModel):
    model_config = ConfigDict(extra="ignore")
    lora_name: str
    lora_path: str


class UnloadLora(BaseModel):
    model_config = ConfigDict(extra="ignore")
    lora_name: str
    lora_int_id: int | None = None


class Tokenize(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class Detokenize(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    tokens: list[int]


class VLLM:
    def __init__(self, service: Service):
        self.service = service
        self.engine = service.engine

    async def load(self, req: LoadLora) -> PlainTextResponse:
        name = req.lora_name.strip()
        if not name or name in (self.service.base_name(), ""):
            raise BadInput("lora_name: give the adapter a name other than the base model's", param="lora_name")
        if name in self.service.adapter_names():
            raise BadInput(f"The lora adapter '{name}' has already been loaded.", param="lora_name")
        path = locate_adapter(req.lora_path, self.engine.loras_dir)  # inside the adapters folder only
        await run_in_threadpool(self.engine.prepare_adapters, [name], {name: path})  # read and checked now
        self.service.runtime[name] = path
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    async def unload(self, req: UnloadLora) -> PlainTextResponse:
        if self.service.runtime.pop(req.lora_name, None) is None:
            raise NotFound(f"The lora adapter '{req.lora_name}' cannot be found.", param="lora_name")
        return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' removed successfully.")

    async def tokenize(self, req: Tokenize) -> dict:
        if (req.prompt is None) == (req.messages is None):
            raise BadInput("give either prompt or messages", param="prompt")
        text = req.prompt
        if req.messages is not None:
            messages = [{"role": m.role, "content": m.text()} for m in req.messages]
            text = await run_in_threadpool(self.engine.chat_prompt, messages, req.add_generation_prompt)
        tokens = await run_in_threadpool(self.engine.tokenize, text, req.add_special_tokens)
        return {"count": len(tokens), "max_model_len": self.engine.loaded.context_length, "tokens": tokens,
                "token_strs": None}

    async def detokenize(self, req: Detokenize) -> dict:
        return {"prompt": await run_in_threadpool(self.engine.detokenize, req.tokens)}
