"""Finding models on disk: list what the models folder holds (folders and `.gguf` files, the
text-generation-webui layout), turn a user's model name into a path, and pick the loader for it through
the registry (webui/backends/registry.py: for `auto`, the first installed loader that claims the path).
An empty model name means the embedded SmolLM2, in the form the chosen loader reads.
"""
from __future__ import annotations

from pathlib import Path

from webui.backends import registry
from webui.errors import LoadFailed, NotFound
from webui.progress import Progress

PARTIAL_SUFFIXES = (".incomplete", ".part", ".tmp")


def list_models(models_dir: Path) -> list[str]:
    """Names of the loadable models in `models_dir`: sub-folders holding a config.json or a .gguf, and
    top-level .gguf files. Hidden and partial entries are skipped."""
    models_dir = Path(models_dir)
    if not models_dir.is_dir():
        return []
    names = []
    for entry in sorted(models_dir.iterdir(), key=lambda p: p.name.lower()):
        if entry.name.startswith(".") or entry.name.endswith(PARTIAL_SUFFIXES):
            continue
        if entry.is_file() and entry.suffix == ".gguf":
            names.append(entry.name)
        elif entry.is_dir() and ((entry / "config.json").is_file() or any(entry.glob("*.gguf"))):
            names.append(entry.name)
    return names


def resolve_model_path(model: str, models_dir: Path) -> Path:
    """A models-dir name or a path → an existing path, else NotFound listing what is there."""
    candidates = [Path(models_dir) / model, Path(model).expanduser()]
    for c in candidates:
        if c.exists():
            # A folder that holds only a GGUF (as download-model.py may leave) is that GGUF.
            if c.is_dir() and not (c / "config.json").exists():
                ggufs = sorted(c.glob("*.gguf"))
                if len(ggufs) == 1:
                    return ggufs[0]
            return c
    have = list_models(models_dir)
    hint = f"; models in {models_dir}: {', '.join(have)}" if have else f"; {models_dir} holds no models"
    raise NotFound(f"model not found: {model}{hint}")


def resolve(model: str, loader: str, models_dir: Path, progress: Progress | None = None,
            wanted=frozenset()) -> tuple[Path, str]:
    """(path, loader) for a ModelSpec's model and loader; `wanted`: the loader options it sets
    (registry.loader_options), which the loader must take."""
    if not model:
        return registry.embedded(loader, Path(models_dir), progress, wanted)
    address_loader = registry.detect_address(model, loader, wanted)  # a remote engine's URL, not a path
    if address_loader is not None:
        return Path(model), address_loader
    path = resolve_model_path(model, models_dir)
    return path, registry.detect(path, loader, wanted)


def loader_for(model: str, loader: str, models_dir: Path, wanted=frozenset()) -> str:
    """The loader `resolve` picks for `model`, found without preparing anything (the embedded model is not
    converted): the Model tab shows that loader's settings while `auto` is chosen. NotFound, BadInput or LoadFailed
    as `resolve` would raise them."""
    if not model:
        names = registry.embedded_candidates(loader, wanted)
        if not names:
            raise LoadFailed("no installed loader provides the embedded model")
        return names[0]
    address_loader = registry.detect_address(model, loader, wanted)
    if address_loader is not None:
        return address_loader
    return registry.detect(resolve_model_path(model, models_dir), loader, wanted)
