"""One status line describing what is answering (model, loader, active adapters), shared by the tabs so
a user always knows which model and adapters produce the replies."""
from __future__ import annotations

from webui.engine import Engine


def adapters_text(engine: Engine) -> str:
    active = engine.active_adapters
    if not active:
        return "adapters: none"
    text = ", ".join(f"{n} × {w:g}" for n, w in active.items())
    return f"adapters: {text}" + (" (merged)" if engine.merged else "")


def model_line(engine: Engine) -> str:
    info = engine.loaded
    if info is None:
        return "**No model loaded** — pick one on the Model tab."
    return f"Answering: **{info.name}** ({info.loader}, {info.device}, {info.dtype}) · {adapters_text(engine)}"
