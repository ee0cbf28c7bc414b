"""The HTTP API: every dialect's routes on one FastAPI app, bound to one Engine through one Service (the
shared request handling in service.py), with one error handler for the whole error family.

- OpenAI (openai.py): /v1/models, /v1/chat/completions, /v1/completions, /v1/adapters;
- vLLM (vllm.py): /v1/load_lora_adapter, /v1/unload_lora_adapter, /tokenize, /detokenize;
- llama-server (llama_server.py): GET/POST /lora-adapters (+ /merge, /unmerge), and `lora` on /v1 requests;
- LoRAX (lorax.py): /generate, /generate_stream, POST / and /info (its own error shape);
- SGLang: `model: "BASE:ADAPTER"` on /v1 requests.
With --api-key, every route needs `Authorization: Bearer KEY`. Bad input is a 4xx with a message; a body
over `max_body` bytes is refused with 413 before it is read whole. Extensions' hooks run on every dialect's
requests (see Service.apply_input).
"""
from __future__ import annotations

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from webui.api import schemas as s
from webui.api.llama_server import LlamaServer
from webui.api.lorax import LoRAX, lorax_error
from webui.api.openai import OpenAI
from webui.api.service import Service
from webui.api.vllm import VLLM
from webui.engine import Engine
from webui.errors import BadInput, LoraDeckError, NotFound, http_status
from webui.extensions import Extensions

LORAX_PATHS = ("/generate", "/generate_stream", "/info", "/")


def error_response(e: LoraDeckError) -> JSONResponse:
    """The OpenAI-style error body for any error of the family, with the status its class maps to."""
    code = e.code or ("model_not_found" if isinstance(e, NotFound) else None)
    body = s.ErrorResponse(error=s.ErrorBody(message=str(e), type=e.error_type, code=code, param=e.param))
    return JSONResponse(body.model_dump(), status_code=http_status(e))


def install(app: FastAPI, engine: Engine, api_key: str = "", extensions: Extensions | None = None,
            max_body: int | None = None) -> Service:
    """Add every dialect's routes and the error handlers to `app` (before the web UI is mounted at /, so
    `POST /` reaches LoRAX's route and everything else at / the UI). `max_body`: the largest request body in
    bytes (FastAPI's own limit, 413 above it)."""
    service = Service(engine, api_key, extensions)
    openai, vllm, llama, lorax = OpenAI(service), VLLM(service), LlamaServer(service), LoRAX(service)
    keyed = [Depends(service.check_key)]

    v1 = APIRouter(prefix="/v1", dependencies=keyed)
    v1.add_api_route("/models", openai.models, methods=["GET"], response_model=s.ModelList)
    v1.add_api_route("/adapters", openai.adapters, methods=["GET"])
    v1.add_api_route("/chat/completions", openai.chat, methods=["POST"])
    v1.add_api_route("/completions", openai.completions, methods=["POST"])
    v1.add_api_route("/load_lora_adapter", vllm.load, methods=["POST"])
    v1.add_api_route("/unload_lora_adapter", vllm.unload, methods=["POST"])
    app.include_router(v1, max_body_size=max_body)

    top = APIRouter(dependencies=keyed)
    top.add_api_route("/tokenize", vllm.tokenize, methods=["POST"])
    top.add_api_route("/detokenize", vllm.detokenize, methods=["POST"])
    top.add_api_route("/lora-adapters", llama.list, methods=["GET"])
    top.add_api_route("/lora-adapters", llama.set, methods=["POST"])
    top.add_api_route("/lora-adapters/merge", llama.merge, methods=["POST"])
    top.add_api_route("/lora-adapters/unmerge", llama.unmerge, methods=["POST"])
    top.add_api_route("/generate", lorax.generate, methods=["POST"])
    top.add_api_route("/generate_stream", lorax.generate_stream, methods=["POST"])
    top.add_api_route("/info", lorax.info, methods=["GET"])
    top.add_api_route("/", lorax.compat, methods=["POST"])
    app.include_router(top, max_body_size=max_body)

    def is_lorax(request: Request) -> bool:
        return request.url.path in LORAX_PATHS

    @app.exception_handler(LoraDeckError)
    async def _error(request: Request, e: LoraDeckError):
        return lorax_error(e) if is_lorax(request) else error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc'][1:]) or 'body'}: {err['msg']}"
                             for err in e.errors())
        return await _error(request, BadInput(f"malformed request: {problems}"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        if request.url.path.startswith("/v1"):
            body = s.ErrorResponse(error=s.ErrorBody(message=str(e.detail), type="invalid_request_error"))
            return JSONResponse(body.model_dump(), status_code=e.status_code)
        return JSONResponse({"detail": e.detail}, status_code=e.status_code)

    return service
