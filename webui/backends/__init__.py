"""The loaders LoRA Deck knows, by name. Each backend module is imported only when it is used, so a
missing optional dependency (say llama-cpp-python) disables that loader rather than the app."""
from __future__ import annotations

import importlib

from webui.backends.base import Backend, ModelLoadError

# name -> "module:Class"; loaders added by later issues register here.
REGISTRY: dict[str, str] = {
    "transformers": "webui.backends.transformers:TransformersBackend",
    "llamacpp": "webui.backends.llamacpp:LlamaCppBackend",
    "gptq": "webui.backends.gptq:GptqBackend",
}


def available_loaders() -> list[str]:
    return list(REGISTRY)


def backend_class(name: str) -> type[Backend]:
    if name not in REGISTRY:
        raise ModelLoadError(f"loader {name!r} is not available; available: {', '.join(REGISTRY)}")
    module, cls = REGISTRY[name].split(":")
    try:
        return getattr(importlib.import_module(module), cls)
    except ImportError as e:
        raise ModelLoadError(f"loader {name!r} cannot start: {e}") from None
