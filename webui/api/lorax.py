"""LoRAX's REST dialect: `POST /generate`, `POST /generate_stream` (SSE), `POST /` (what LoRAX's Python client
posts to: a JSON list for `stream: false`, SSE for `stream: true`) and `GET /info`, with LoRAX's request
body (`inputs` + `parameters`: adapter_id/adapter_source, merged_adapters, details,
decoder_input_details, return_k_alternatives and the sampling fields) and its response and error shapes
(`{"error", "error_type"}`; bad input is a 422 "validation" error as LoRAX answers it).

Token details come from scoring the reply after generation (see webui/api/service.py), so a stream's token
events are sent when the reply is complete, each with its exact id, text and logprob; the requests still
batch with every other request in the scheduler.
"""
from __future__ import annotations

import json

from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from webui import __version__
from webui.api.service import Service
from webui.errors import BadInput, LoraDeckError, http_status

FINISH = {"length": "length", "stop": "eos_token", "cancelled": "eos_token"}


class MergedAdapters(BaseModel):
    ids: list[str]
    weights: list[float]
    merge_strategy: str | None = None
    density: float = Field(1.0, ge=0, le=1)
    majority_sign_method: str | None = None


class LoraxResponseFormat(BaseModel):
    """LoRAX's structured output: JSON, following `schema` when one is given."""

    type: str = "json_object"
    schema_: dict | None = Field(None, alias="schema")


class Parameters(BaseModel):
    model_config = ConfigDict(extra="ignore")

    adapter_id: str | None = None
    adapter_source: str | None = None
    merged_adapters: MergedAdapters | None = None
    do_sample: bool = False
    max_new_tokens: int | None = Field(None, ge=1)
    repetition_penalty: float | None = Field(None, gt=0)
    return_full_text: bool = False
    stop: list[str] = []
    seed: int | None = Field(None, ge=0)
    temperature: float | None = Field(None, ge=0)
    top_k: int | None = Field(None, gt=0)
    top_p: float | None = Field(None, gt=0, le=1)
    typical_p: float | None = Field(None, gt=0, le=1)
    details: bool = False
    decoder_input_details: bool = False
    return_k_alternatives: int | None = Field(None, gt=0, le=20)
    response_format: LoraxResponseFormat | None = None

    def sampling(self) -> dict:
        """GenerationParams fields. LoRAX samples only with do_sample (or a temperature/top_*): else greedy."""
        sample = self.do_sample or any(v is not None for v in (self.temperature, self.top_k, self.top_p,
                                                                  self.typical_p))
        out = {"temperature": (self.temperature if self.temperature is not None else 1.0) if sample else 0.0,
               "stop": list(self.stop)}
        for name in ("top_k", "top_p", "typical_p", "repetition_penalty", "seed", "max_new_tokens"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        if self.response_format is not None:
            schema = self.response_format.schema_
            out["response_format"] = json.dumps(schema) if schema else "json"
        return out


class GenerateRequest(BaseModel):
    inputs: str = Field(min_length=1)
    parameters: Parameters = Parameters()
    stream: bool = False


def lorax_error(e: LoraDeckError) -> JSONResponse:
    status = http_status(e)
    if status == 400:
        status = 422  # LoRAX's status for input validation errors
    kind = "validation" if status < 500 else "generation"
    return JSONResponse({"error": str(e), "error_type": kind}, status_code=status)


class LoRAX:
    def __init__(self, service: Service):
        self.service = service
        self.engine = service.engine

    def info(self) -> dict:
        info = self.engine.loaded
        base = self.service.base_name()
        return {"model_id": base, "model_sha": None, "model_dtype": info.dtype, "model_device_type": info.device,
                "model_pipeline_tag": "lorax", "max_concurrent_requests": 128, "max_best_of": 1,
                "max_stop_sequences": 16, "max_input_length": info.context_length,
                "max_total_tokens": info.context_length, "waiting_served_ratio": 1.2,
                "max_batch_total_tokens": info.context_length * self.engine.max_batch,
                "max_waiting_tokens": 20, "validation_workers": 1, "version": __version__, "sha": None,
                "docker_label": None, "loader": info.loader, "adapters": self.service.adapter_names()}

    async def compat(self, req: GenerateRequest):
        """`POST /`: LoRAX's Python client posts here, with `stream` in the body."""
        if req.stream:
            return await self.generate_stream(req)
        return [await self.generate(req)]

    async def generate(self, req: GenerateRequest) -> dict:
        out, details = await self._run(req)
        body = {"generated_text": (req.inputs if req.parameters.return_full_text else "") + out.text}
        if req.parameters.details:
            body["details"] = details
        return body

    async def generate_stream(self, req: GenerateRequest) -> StreamingResponse:
        try:
            out, details = await self._run(req, always_scores=True)
        except LoraDeckError as e:  # nothing is sent yet: a plain error response
            return lorax_error(e)

        def events():
            tokens = details["tokens"]
            for i, token in enumerate(tokens):
                last = i == len(tokens) - 1
                event = {"token": token, "generated_text": out.text if last else None,
                         "details": {k: details[k] for k in ("finish_reason", "prompt_tokens", "generated_tokens",
                                                              "seed")} if last else None}
                yield f"data:{json.dumps(event)}\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    async def _run(self, req: GenerateRequest, always_scores: bool = False):
        p, service = req.parameters, self.service
        merged = p.merged_adapters
        if merged is not None and p.adapter_id:
            raise BadInput("give at most one of adapter_id and merged_adapters", param="adapter_id")
        stack = await run_in_threadpool(lambda: service.stack(
            adapter_id=p.adapter_id, adapter_source=p.adapter_source, merged=merged,
            model=None if p.adapter_id or merged else ""))
        params = service.params(p.sampling())
        prompts, params, state = await run_in_threadpool(lambda: service.apply_input(params, prompts=[req.inputs]))
        stack = await run_in_threadpool(service.extension_stack, stack, state)
        prompt_tokens = await run_in_threadpool(service.check_context, prompts[0], params.max_new_tokens)
        out = await service.finish(service.submit(prompts, params, stack)[0], None if always_scores else state)
        details = {"finish_reason": FINISH.get(out.finish_reason, "length"), "prompt_tokens": prompt_tokens,
                   "generated_tokens": out.completion_tokens, "seed": p.seed if p.seed is not None else None,
                   "prefill": [], "tokens": []}
        if p.details or p.decoder_input_details or always_scores:
            k = p.return_k_alternatives or 0
            prompt, reply = await run_in_threadpool(service.scores, prompts[0], out.text, stack, k,
                                                    out.ids)
            if p.decoder_input_details:
                details["prefill"] = [{"id": i, "text": t, "logprob": lp}
                                      for i, t, lp in zip(prompt.ids, prompt.texts, prompt.logprobs)]
            details["tokens"] = [self._token(i, t, lp, top, k) for i, t, lp, top in
                                 zip(reply.ids, reply.texts, reply.logprobs, reply.top or [None] * len(reply.ids))]
            details["generated_tokens"] = len(reply.ids)
        return out, details

    @staticmethod
    def _token(token_id: int, text: str, logprob: float, top, k: int) -> dict:
        token = {"id": token_id, "text": text, "logprob": logprob, "special": False}
        if k and top:
            token["alternative_tokens"] = [{"id": i, "text": t, "logprob": lp} for i, t, lp in top]
        return token
