"""The loader registry: the one place that lists LoRA Deck's loaders. Everything else about a loader — its
settings, which model paths it claims, how it provides the embedded model, whether its optional dependency
is installed, how it trains — is declared on its Backend class (webui/backends/base.py); `models.py`, the
Model tab, the CLI's choices and the trainer all ask this module. Adding a loader is one module, one line
in LOADERS and its key in the options' `LoaderName`.

LOADERS is ordered like PEFT's dispatcher list: for `--loader auto` the first loader whose dependency is
installed and that claims a path gets it, so specific loaders (a GGUF file, a GPTQ folder) come before the
general one (transformers, which reads all three and is the fallback when an optional loader is missing).

The options (webui/options/config.py, `LoaderName`) name the loaders by key for the CLI's and the Model tab's
choices; this module maps each key to its class and refuses to start when the two lists disagree. It imports
no loader at import time; a loader's module is imported by `backend_class` on first use.
"""
from __future__ import annotations

import dataclasses
import importlib
import typing
from pathlib import Path

from webui.errors import BadInput, LoadFailed, NotFound
from webui.options.config import LoaderName

# name -> "module:Class", in claim order
LOADERS: dict[str, str] = {
    "llamacpp": "webui.backends.llamacpp.loader:LlamaCppBackend",
    "gptq": "webui.backends.hf.gptq:GptqBackend",
    "transformers": "webui.backends.hf.transformers:TransformersBackend",
    "remote": "webui.backends.remote.loader:RemoteBackend",  # an engine's URL (claims_address), never a path
    # engines LoRA Deck runs itself on a model path; never picked by auto (they claim nothing)
    "vllm": "webui.backends.remote.managed:VllmBackend",
    "llama-server": "webui.backends.remote.managed:LlamaServerBackend",
}
FALLBACK = "transformers"  # needs only the core dependencies, and reads every format the others claim
if set(LOADERS) != set(typing.get_args(LoaderName)) - {"auto"}:  # a loader added in one place only
    raise ImportError(f"the loaders in LOADERS ({', '.join(LOADERS)}) and in webui.options.config.LoaderName "
                      f"({', '.join(typing.get_args(LoaderName))}) differ: name a new loader in both")


def names() -> tuple[str, ...]:
    return tuple(LOADERS)


def backend_class(name: str):
    """The Backend class registered as `name` (its module is imported now)."""
    if name not in LOADERS:
        raise NotFound(f"loader {name!r} does not exist; loaders: {', '.join(LOADERS)}")
    module, cls = LOADERS[name].split(":")
    try:
        return getattr(importlib.import_module(module), cls)
    except ImportError as e:
        raise LoadFailed(f"loader {name!r} cannot start: {e}") from None


def available() -> list[str]:
    """The loaders whose optional dependencies are installed, in claim order."""
    return [name for name in LOADERS if backend_class(name).available()]


def require(name: str) -> None:
    """Refuse a loader whose optional dependency is missing, naming the package to install."""
    cls = backend_class(name)
    if not cls.available():
        raise LoadFailed(f"the {name} loader needs {', '.join(cls.requires)}, which is not installed "
                         f"(./start.sh installs it); loaders available: {', '.join(available())}")


def loader_options(spec) -> frozenset[str]:
    """The loader-specific settings a ModelSpec asks for: fields marked `loader_option` in their metadata
    (e.g. quantization) set to something other than their default."""
    return frozenset(f.name for f in dataclasses.fields(spec)
                     if f.metadata.get("loader_option") and getattr(spec, f.name) != f.default)


def _takes(name: str, wanted) -> bool:
    return set(wanted) <= set(backend_class(name).settings)


def check_options(name: str, wanted) -> None:
    """Refuse loader-specific settings that loader `name` does not take, naming the loaders that do."""
    missing = sorted(set(wanted) - set(backend_class(name).settings))
    if missing:
        owners = [n for n in LOADERS if _takes(n, missing)] or ["no"]
        raise BadInput(f"{', '.join(missing)}: the {name} loader does not take this setting; it is an option of "
                       f"the {' / '.join(owners)} loader (--loader {owners[0]})")


def detect(path: Path, requested: str = "auto", wanted=frozenset()) -> str:
    """The loader for a model path: `requested` itself (checked to be installed and to take the `wanted`
    loader options), or for `auto` the first installed loader that takes them and claims the path."""
    if requested != "auto":
        require(requested)
        check_options(requested, wanted)
        return requested
    for name in available():
        if _takes(name, wanted) and backend_class(name).claims(Path(path)):
            return name
    check_options(FALLBACK, wanted)
    return FALLBACK


def _claims_address(name: str, model: str) -> bool:
    try:
        return backend_class(name).claims_address(model)
    except LoadFailed:  # a loader whose module cannot import claims nothing
        return False


def detect_address(model: str, requested: str = "auto", wanted=frozenset()) -> str | None:
    """The loader for a model string that is an address rather than a path (a remote engine's URL), or None
    when no loader claims it. A loader asked for by name must be the one that claims it."""
    owners = [name for name in LOADERS if _claims_address(name, model)]
    if not owners:
        if requested != "auto" and _claims_address(requested, "http://"):
            raise BadInput(f"the {requested} loader needs an engine's URL (http://HOST:PORT) as the model, "
                           f"not {model!r}")
        return None
    if requested == "auto":
        requested = owners[0]
    elif requested not in owners:
        raise BadInput(f"{model} is an address, not a model file: load it with --loader {owners[0]}")
    require(requested)
    check_options(requested, wanted)
    return requested


def embedded_candidates(requested: str, wanted=frozenset()) -> list[str]:
    """The loaders that may provide the embedded model for `requested`, in the order `embedded` tries them (the
    first one does, for every loader that ships with LoRA Deck)."""
    if requested != "auto":
        require(requested)
        check_options(requested, wanted)
        return [requested]
    return [n for n in available() if backend_class(n).embedded_by_default and _takes(n, wanted)]


def embedded(requested: str, models_dir: Path, progress=None, wanted=frozenset()) -> tuple[Path, str]:
    """(path, loader) of the embedded default model for `requested` (auto: the first installed loader that
    takes the `wanted` loader options and provides one). Each loader provides it in its own format (a GGUF
    file, a converted folder, ...)."""
    for name in embedded_candidates(requested, wanted):
        path = backend_class(name).embedded(Path(models_dir), progress)
        if path is not None:
            return path, name
    raise LoadFailed(f"no loader provides the embedded model{'' if requested == 'auto' else ' on ' + requested}")
