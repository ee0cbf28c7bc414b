"""The OpenAI-compatible routes under /v1: models, chat completions, text completions (streamed as SSE or
not) and adapters with their compatibility reports. Every request may name its own adapter (`model`), a
weighted stack (`adapters`) or a LoRAX-style `adapter_id` + `adapter_source`; requests go through the
Engine's scheduler, which batches concurrent ones. Bad input is answered with OpenAI-style JSON errors
and a 4xx status; with --api-key every route needs `Authorization: Bearer KEY`.
"""
from __future__ import annotations

import json
import secrets
import time
import uuid
from pathlib import Path

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from webui.api import schemas as s
from webui.config import GenerationParams
from webui.engine import Engine, check_weights
from webui.errors import BadInput, LoraDeckError, NoModelLoaded, NotFound, Unauthorized, first_line, http_status
from webui.hub.fetch import fetch_adapter


def error_response(e: LoraDeckError) -> JSONResponse:
    """The OpenAI-style error body for any error of the family, with the status its class maps to."""
    code = e.code or ("model_not_found" if isinstance(e, NotFound) else None)
    body = s.ErrorResponse(error=s.ErrorBody(message=str(e), type=e.error_type, code=code, param=e.param))
    return JSONResponse(body.model_dump(), status_code=http_status(e))


class API:
    """Binds the routes to one Engine (and the server's options)."""

    def __init__(self, engine: Engine, api_key: str = ""):
        self.engine = engine
        self.api_key = api_key

    # -- helpers -------------------------------------------------------------------------------------
    def check_key(self, request: Request) -> None:
        if not self.api_key:
            return
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
            raise Unauthorized("invalid or missing API key (send Authorization: Bearer KEY)", code="invalid_api_key")

    def base_name(self) -> str:
        info = self.engine.loaded
        if info is None:
            raise NoModelLoaded("no model is loaded", code="model_not_loaded")
        return info.name

    def adapters_for(self, req: s._Sampling) -> dict | None:
        """The adapter stack a request asks for (None: the app's active stack)."""
        base = self.base_name()
        if req.adapters is not None:
            if req.model not in (None, "", base):
                raise BadInput("with `adapters`, `model` must be \"\" or the base model's name", param="model")
            stack = {a.name: a.weight for a in req.adapters}
        elif req.adapter_id:
            stack = {self._adapter_from_source(req.adapter_id, req.adapter_source or "hub"): 1.0}
        elif req.model is None:
            return None  # no model named: what the app is using (the adapters active in the UI / --lora)
        elif req.model in ("", base):
            return {}  # the base model's name: the plain base
        elif req.model in self.engine.list_adapters():
            stack = {req.model: 1.0}
        else:
            raise NotFound(f"model {req.model!r} not found: use {base!r} or an adapter of GET /v1/models",
                           code="model_not_found", param="model")
        check_weights(stack)
        self.engine.prepare_adapters(list(stack))
        return stack

    def _adapter_from_source(self, adapter_id: str, source: str) -> str:
        """The name (in the adapters folder) of a LoRAX-style adapter: hub and S3 ones are fetched into the
        folder once; a local one is a name, or a path that must lie inside the folder."""
        return Path(fetch_adapter(adapter_id, source, self.engine.loras_dir, restrict_local=True)).name

    def params_for(self, req: s._Sampling, prompt: str) -> tuple[GenerationParams, int]:
        try:
            params = GenerationParams.from_dict(req.sampling())
        except TypeError as e:  # a value of the wrong type that the dataclass did not catch
            raise BadInput(first_line(e)) from None
        prompt_tokens = self.engine.count_tokens(prompt)
        limit = self.engine.loaded.context_length
        if limit and prompt_tokens + params.max_new_tokens > limit:
            raise BadInput(f"this request needs {prompt_tokens} prompt + {params.max_new_tokens} new tokens, "
                                f"more than the model's context of {limit}; shorten the prompt or lower max_tokens",
                           code="context_length_exceeded", param="max_tokens")
        return params, prompt_tokens

    # -- routes --------------------------------------------------------------------------------------
    def models(self) -> s.ModelList:
        base = self.base_name()
        now = int(time.time())
        cards = [s.ModelCard(id=base, created=now)]
        cards += [s.ModelCard(id=n, created=now, parent=base, kind="adapter") for n in self.engine.list_adapters()]
        return s.ModelList(data=cards)

    def adapters(self) -> dict:
        out = []
        for name in self.engine.list_adapters():
            try:
                out.append(self.engine.adapter_report(name).to_dict())
            except LoraDeckError as e:
                out.append({"adapter": name, "verdict": "incompatible", "reasons": [str(e)]})
        return {"object": "list", "data": out}

    async def chat(self, req: s.ChatCompletionRequest):
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
        prompt = await run_in_threadpool(self.engine.chat_prompt, messages)
        return await self._complete(req, prompt, chat=True)

    async def completions(self, req: s.CompletionRequest):
        prompt = req.prompt_text()
        if prompt is None:
            raise BadInput("prompt: only one prompt per request is supported", param="prompt")
        return await self._complete(req, prompt, chat=False)

    async def _complete(self, req: s._Sampling, prompt: str, chat: bool):
        stack = await run_in_threadpool(self.adapters_for, req)
        params, prompt_tokens = await run_in_threadpool(self.params_for, req, prompt)
        model = req.model or self.base_name()
        handle = self.engine.scheduler.submit(prompt, params, stack)
        rid, created = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", int(time.time())
        if req.stream:
            return StreamingResponse(self._sse(handle, rid, created, model, chat), media_type="text/event-stream")
        try:
            text = await run_in_threadpool(handle.text)
        except Exception as e:
            raise LoraDeckError(f"generation failed: {first_line(e)}") from e
        finally:
            handle.close()
        completion_tokens = handle.completion_tokens if handle.completion_tokens is not None else \
            await run_in_threadpool(self.engine.count_tokens, text)
        usage = s.Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                        total_tokens=prompt_tokens + completion_tokens)
        reason = handle.finish_reason
        if chat:
            return s.ChatCompletion(id=rid, created=created, model=model, usage=usage, choices=[
                s.ChatChoice(message=s.ChatChoiceMessage(content=text), finish_reason=reason)])
        return s.Completion(id=rid, created=created, model=model, usage=usage,
                            choices=[s.CompletionChoice(text=text, finish_reason=reason)])

    async def _sse(self, handle, rid: str, created: int, model: str, chat: bool):
        def chunk(text=None, reason=None, first=False) -> str:
            if chat:
                body = s.ChatCompletionChunk(id=rid, created=created, model=model, choices=[s.ChunkChoice(
                    delta=s.ChunkDelta(role="assistant" if first else None, content=text), finish_reason=reason)])
            else:
                body = s.Completion(id=rid, created=created, model=model,
                                    choices=[s.CompletionChoice(text=text or "", finish_reason=reason)])
            return f"data: {body.model_dump_json(exclude_none=chat)}\n\n"

        try:
            if chat:
                yield chunk(first=True)
            async for delta in iterate_in_threadpool(iter(handle)):
                yield chunk(delta)
            yield chunk(reason=handle.finish_reason)
        except Exception as e:  # the status line is sent already: report in the stream, as OpenAI does
            yield f"data: {json.dumps({'error': {'message': f'generation failed: {e}', 'type': 'server_error'}})}\n\n"
        finally:
            handle.close()  # a client that went away frees its slot
        yield "data: [DONE]\n\n"


def install(app: FastAPI, engine: Engine, api_key: str = "") -> API:
    """Add the /v1 routes and their error handlers to `app`."""
    api = API(engine, api_key)
    router = APIRouter(prefix="/v1", dependencies=[Depends(api.check_key)])
    router.add_api_route("/models", api.models, methods=["GET"], response_model=s.ModelList)
    router.add_api_route("/adapters", api.adapters, methods=["GET"])
    router.add_api_route("/chat/completions", api.chat, methods=["POST"])
    router.add_api_route("/completions", api.completions, methods=["POST"])
    app.include_router(router)

    @app.exception_handler(LoraDeckError)
    async def _error(request: Request, e: LoraDeckError):
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc'][1:]) or 'body'}: {err['msg']}" for err in e.errors())
        return error_response(BadInput(f"malformed request: {problems}"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        if request.url.path.startswith("/v1"):
            body = s.ErrorResponse(error=s.ErrorBody(message=str(e.detail), type="invalid_request_error"))
            return JSONResponse(body.model_dump(), status_code=e.status_code)
        return JSONResponse({"detail": e.detail}, status_code=e.status_code)

    return api
