"""Pydantic models of the OpenAI-compatible API: requests (chat and text completions with the usual
sampling fields, logprobs, echo, n, several prompts; plus the adapter fields other servers' clients send:
LoRA Deck's `adapters` stack, LoRAX's `adapter_id`/`adapter_source`, llama-server's `lora`) and responses
(completions, stream chunks, model and adapter lists, errors). Unknown request fields are ignored as
OpenAI's server does; wrongly typed ones are a 400.
"""
from __future__ import annotations

import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, model_validator


class AdapterWeight(BaseModel):
    name: str
    weight: float = 1.0


class CompareStack(BaseModel):
    """A fan-out target that is a weighted stack."""
    adapters: list[AdapterWeight]


class LoraScale(BaseModel):
    """llama-server's per-request adapter setting: an id of GET /lora-adapters and its scale."""

    id: int
    scale: float = 1.0


class StreamOptions(BaseModel):
    include_usage: bool = False


class JsonSchema(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str = "reply"
    schema_: dict = Field(alias="schema")


class ResponseFormat(BaseModel):
    """OpenAI's structured output: text, any JSON object, or JSON following a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchema | None = None

    @model_validator(mode="after")
    def _schema_given(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type json_schema needs json_schema: {name, schema}")
        return self

    def value(self) -> str:
        """GenerationParams.response_format: "", "json" or the schema as JSON text."""
        if self.type == "json_schema":
            return json.dumps(self.json_schema.schema_)
        return "json" if self.type == "json_object" else ""


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None  # omitted: the app's active adapters; "" or the base's name: the plain base
    max_tokens: int | None = Field(None, gt=0)
    max_completion_tokens: int | None = Field(None, gt=0)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, le=1)
    typical_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, ge=1, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    n: int = Field(1, ge=1, le=16)
    user: str | None = None
    # LoRA Deck: a weighted stack of adapters from the adapters folder (then `model` is "" or the base)
    adapters: list[AdapterWeight] | None = None
    # LoRAX: load an adapter on demand
    adapter_id: str | None = None
    adapter_source: Literal["hub", "local", "s3"] | None = None
    # llama-server: adapters by id (GET /lora-adapters) with a scale each
    lora: list[LoraScale] | None = None
    # LoRA Deck fan-out: one choice per target ("" or the base's name, an adapter, or a stack), batched
    compare: list[str | CompareStack] | None = Field(None, min_length=1, max_length=16)

    def adapter_fields(self) -> dict:
        """The adapter-choosing fields, for Service.stack."""
        return dict(model=self.model, adapters=None if self.adapters is None else
                    {a.name: a.weight for a in self.adapters}, adapter_id=self.adapter_id,
                    adapter_source=self.adapter_source, lora=self.lora)

    def sampling(self) -> dict:
        """The GenerationParams fields this request sets (the rest keep the app's defaults)."""
        fields = ("temperature", "top_p", "top_k", "min_p", "typical_p", "repetition_penalty",
                  "presence_penalty", "frequency_penalty", "seed")
        out = {f: getattr(self, f) for f in fields if getattr(self, f) is not None}
        limit = self.max_completion_tokens or self.max_tokens
        if limit is not None:
            out["max_new_tokens"] = limit
        if self.stop is not None:
            out["stop"] = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        if self.response_format is not None:
            out["response_format"] = self.response_format.value()
        return out


class TextPart(BaseModel):
    type: Literal["text"] = "text"
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


class CompletionRequest(_Sampling):
    prompt: str | list[str] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=0)  # 0 with echo: only the prompt's logprobs (lm-eval does this)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatChoiceMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob]


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatChoiceMessage
    finish_reason: str | None
    logprobs: ChoiceLogprobs | None = None


class ComparedChatChoice(ChatChoice):
    model: str  # the fan-out target this choice answers for




class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[SerializeAsAny[ChatChoice]]  # a fan-out's choices carry their `model`
    usage: Usage


class ChunkDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: ChunkDelta
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class CompletionLogprobs(BaseModel):
    """The legacy completions shape: one entry per token; the first prompt token's logprob is null."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: str | None = None
    logprobs: CompletionLogprobs | None = None


class ComparedCompletionChoice(CompletionChoice):
    model: str  # the fan-out target this choice answers for


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[SerializeAsAny[CompletionChoice]]  # a fan-out's choices carry their `model`
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "lora-deck"
    root: str | None = None    # vLLM: the model (base) or the adapter's path
    parent: str | None = None  # vLLM: the base an adapter runs on
    kind: Literal["base", "adapter"] = "base"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
