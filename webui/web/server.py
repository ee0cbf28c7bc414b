"""The HTTP server: one FastAPI app on one host and port, with the Gradio UI mounted at `/` and the
OpenAI-compatible routes under `/v1`. It creates the one Engine, loads the start-up
model, and hands the Engine to the UI. Binds to 127.0.0.1 unless told otherwise. With --auth every Gradio
route but the login page's needs a session (webui/web/gate.py); with --api-key every API route but /health
needs the key, and the API's schema pages (/docs, /openapi.json) are not served. The loaded extensions are
shared by the Chat tab and the API.
"""
from __future__ import annotations

import ipaddress
import logging
import sys
import threading
from pathlib import Path

import uvicorn
from fastapi import FastAPI

from webui.api.routes import install
from webui.engine import Engine
from webui.errors import LoraDeckError
from webui.extensions import Extensions
from webui.options.config import ServerConfig

log = logging.getLogger("webui.web.server")
SHUTDOWN_GRACE = 5  # seconds open requests get to finish once the app is told to stop (Ctrl-C, SIGTERM)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_extensions(cfg: ServerConfig) -> Extensions:
    """The extensions named with --extensions or ticked in the UI (user_data/settings.yaml), loaded once."""
    extensions = Extensions(Path(cfg.extensions_dir), cfg.paths["user"] / "settings.yaml")
    extensions.load_all([*cfg.extensions, *(extensions.settings().get("extensions") or [])])
    return extensions


def build_app(engine: Engine, cfg: ServerConfig) -> FastAPI:
    # the schema pages list every route and field: behind --api-key they are not served at all
    docs = {"openapi_url": None} if cfg.api_key else {}
    app = FastAPI(title="LoRA Deck", **docs)
    extensions = load_extensions(cfg)

    @app.get("/health")
    def health():
        info = engine.loaded
        return {"status": "ok", "model": info.name if info else None, "loader": info.loader if info else None,
                "adapters": engine.active_adapters, "merged": engine.merged}

    install(app, engine, api_key=cfg.api_key, extensions=extensions, max_body=int(cfg.max_request_mb * 2**20))

    if not cfg.nowebui:
        import gradio as gr  # slow to import: only when the web UI is served

        from webui.ui import build_ui
        from webui.web.gate import gate_gradio

        auth = tuple(cfg.auth.split(":", 1)) if cfg.auth else None
        demo = build_ui(engine, cfg, extensions)
        app = gr.mount_gradio_app(app, demo, path="/", auth=auth)
        if auth:
            gate_gradio(app)
    return app


def serve(cfg: ServerConfig) -> int:
    if not is_loopback(cfg.listen_host) and not (cfg.auth or cfg.api_key):
        log.warning("listening on %s without --auth or --api-key: anyone on the network can use this server",
                    cfg.listen_host)
    elif not is_loopback(cfg.listen_host) and not cfg.api_key:
        log.warning("listening on %s: --auth protects the web UI only; /v1 is open without --api-key",
                    cfg.listen_host)
    engine = Engine(cfg.models_dir, cfg.loras_dir, cfg.runs_dir)
    try:
        engine.load(cfg.spec, progress=lambda f, msg: log.info("%s", msg))
    except LoraDeckError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if cfg.lora:
        weights = [float(w) for w in cfg.lora_weights] or [1.0] * len(cfg.lora)
        try:
            active = engine.set_adapters(dict(zip(cfg.lora, weights)))
        except LoraDeckError as e:
            print(f"error: --lora: {e}", file=sys.stderr)
            return 1
        log.info("adapters: %s", ", ".join(f"{n} × {w:g}" for n, w in active.items()))
    app = build_app(engine, cfg)
    print(f"LoRA Deck: http://{cfg.listen_host}:{cfg.port}/", flush=True)
    # an open page holds a Gradio stream open, and uvicorn waits for every connection to close before it exits:
    # without a limit, Ctrl-C or SIGTERM did not stop the app while a browser tab was open (and a managed engine
    # stayed up with it); after SHUTDOWN_GRACE seconds the requests still open are cancelled
    try:
        uvicorn.run(app, host=cfg.listen_host, port=cfg.port, log_level="warning",
                    timeout_graceful_shutdown=SHUTDOWN_GRACE)
    finally:
        # a managed engine (vllm, llama-server) stopped now rather than by its guardian once we are gone; in a
        # thread with a limit, so that a request still holding the model cannot keep the app from exiting
        done = threading.Thread(target=engine.unload, name="unload-at-exit", daemon=True)
        done.start()
        done.join(30)
    return 0
