"""Finding models on disk: list what the models folder holds (folders and `.gguf` files, the
text-generation-webui layout), turn a user's model name into a path, and pick the loader that fits
(`auto`: a `.gguf` → llamacpp, a folder whose config carries a GPTQ `quantization_config` → gptq,
anything else → transformers; a loader that is not installed falls back to transformers, which can
read all three).
"""
from __future__ import annotations

import json
from pathlib import Path

from webui import embedded
from webui.backends import available_loaders
from webui.backends.base import ModelLoadError

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
    """A models-dir name or a path → an existing path, else ModelLoadError listing what is there."""
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
    raise ModelLoadError(f"model not found: {model}{hint}")


def is_gptq_folder(path: Path) -> bool:
    try:
        qc = json.loads((path / "config.json").read_text()).get("quantization_config") or {}
    except (OSError, ValueError):
        return False
    return str(qc.get("quant_method", "")).lower() == "gptq"


def detect_loader(path: Path, requested: str = "auto") -> str:
    if requested != "auto":
        if requested not in available_loaders():
            raise ModelLoadError(f"loader {requested!r} is not available yet; available: {', '.join(available_loaders())}")
        return requested
    if path.is_file() and path.suffix == ".gguf":
        wanted = "llamacpp"
    elif path.is_dir() and is_gptq_folder(path):
        wanted = "gptq"
    else:
        wanted = "transformers"
    return wanted if wanted in available_loaders() else "transformers"


def resolve(model: str, loader: str, models_dir: Path, progress=None) -> tuple[Path, str]:
    """(path, loader) for a ModelSpec's model/loader. An empty model means the embedded SmolLM2:
    its GGUF for llama.cpp, a 4-bit GPTQ folder quantized from it once for gptq, else a safetensors folder
    converted from it once under models_dir."""
    if not model:
        if loader == "auto":
            loader = "llamacpp" if "llamacpp" in available_loaders() else "transformers"
        if loader == "llamacpp":
            return embedded.gguf_path(), detect_loader(embedded.gguf_path(), loader)
        if loader == "gptq":  # quantized once (from the safetensors folder) and reused after
            from webui.export_gptq import ensure_embedded
            folder = ensure_embedded(Path(models_dir), progress)
            return folder, detect_loader(folder, loader)
        folder = embedded.ensure_transformers_folder(Path(models_dir), progress)
        return folder, detect_loader(folder, loader)
    path = resolve_model_path(model, models_dir)
    return path, detect_loader(path, loader)
