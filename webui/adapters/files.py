"""Reading a PEFT adapter folder safely: `adapter_config.json` plus `adapter_model.safetensors` or
`adapter_model.bin` (safetensors wins when both exist, as in LoRAX; `.bin` is read only with
`torch.load(weights_only=True)`, so a pickle that would run code is refused). Names given by users and
API requests resolve only inside the adapters folder. A GGUF LoRA (a `.gguf` file, or a folder holding one
and no adapter_config.json) is read by webui.adapters.gguf_lora for the llama.cpp loader. Every problem
raises AdapterError with a message that names the file and the problem.
"""
from __future__ import annotations

import json
import math
import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path

from webui.errors import first_line as _first_line

CONFIG = "adapter_config.json"
SAFETENSORS = "adapter_model.safetensors"
BIN = "adapter_model.bin"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+\-]{0,127}$")


class AdapterError(ValueError):
    """An adapter cannot be used; the message says why in plain words."""


@dataclass
class AdapterFiles:
    name: str
    path: Path
    config: dict
    weights: Path
    format: str  # "safetensors" | "bin"
    size: int
    reasons: list = field(default_factory=list)  # filled by inspection

    def signature(self) -> tuple:
        """Changes when the files change: a cached adapter is reloaded then."""
        return tuple((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in (self.path / CONFIG, self.weights))


def list_adapters(loras_dir: Path) -> list[str]:
    loras_dir = Path(loras_dir)
    if not loras_dir.is_dir():
        return []
    return sorted((p.name for p in loras_dir.iterdir() if not p.name.startswith(".") and (
        (p.is_dir() and ((p / CONFIG).is_file() or any(p.glob("*.gguf")))) or (p.is_file() and p.suffix == ".gguf"))),
        key=str.lower)


def check_adapter_name(name: str, loras_dir: Path) -> None:
    """A plain folder name: no separators, no '..', so it cannot leave the adapters folder."""
    if not name or not _NAME.match(name) or name in (".", ".."):
        raise AdapterError(f"adapter name {name!r} is not allowed: use the name of a folder inside {loras_dir} "
                           "(letters, digits, '.', '_', '+', '-'); names cannot leave the adapters folder")


def resolve_adapter(name: str, loras_dir: Path, allow_paths: bool = False) -> Path:
    """An adapter name → its folder inside `loras_dir`. With allow_paths (the CLI), an existing folder path
    is accepted too. A name that would leave the adapters folder is refused."""
    loras_dir = Path(loras_dir)
    if allow_paths and os.sep in str(name) and Path(name).expanduser().is_dir():
        return Path(name).expanduser()
    check_adapter_name(name, loras_dir)
    path = loras_dir / name
    root = loras_dir.resolve()
    if root not in path.resolve().parents:
        raise AdapterError(f"adapter {name!r} escapes the adapters folder {loras_dir}")
    if not (path.is_dir() or (path.is_file() and path.suffix == ".gguf")):
        have = list_adapters(loras_dir)
        hint = f"; adapters in {loras_dir}: {', '.join(have)}" if have else f"; {loras_dir} holds no adapters"
        raise AdapterError(f"adapter not found: {name}{hint}")
    return path


def read_adapter(path: Path, name: str | None = None) -> AdapterFiles:
    """Read and sanity-check the config; locate the weights file. Does not load tensors."""
    path = Path(path)
    name = name or path.name
    cfg_file = path / CONFIG
    if path.suffix == ".gguf" or (not cfg_file.is_file() and any(path.glob("*.gguf"))):
        from webui.adapters.gguf_lora import read_gguf_adapter  # a GGUF LoRA file (llama.cpp loader)
        return read_gguf_adapter(path, name)
    if not cfg_file.is_file():
        raise AdapterError(f"{name}: {CONFIG} is missing — not a PEFT adapter folder")
    try:
        config = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise AdapterError(f"{name}: {CONFIG} is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{name}: {CONFIG} must hold a JSON object")
    check_lora_config(name, config)
    if (path / SAFETENSORS).is_file():
        weights, fmt = path / SAFETENSORS, "safetensors"
    elif (path / BIN).is_file():
        weights, fmt = path / BIN, "bin"
    else:
        raise AdapterError(f"{name}: no weights file ({SAFETENSORS} or {BIN})")
    return AdapterFiles(name=name, path=path, config=config, weights=weights, format=fmt,
                        size=weights.stat().st_size)


def check_lora_config(name: str, config: dict) -> None:
    """Refuse configs whose LoRA numbers make no sense (before any tensor is read)."""
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise AdapterError(f"{name}: a {peft_type} adapter; only LoRA adapters are supported")
    r = config.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise AdapterError(f"{name}: rank r={r!r} in {CONFIG} must be a positive integer")
    alpha = config.get("lora_alpha", r)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha) or alpha <= 0:
        raise AdapterError(f"{name}: lora_alpha={alpha!r} in {CONFIG} must be a positive number")
    dropout = config.get("lora_dropout", 0.0) or 0.0
    if not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise AdapterError(f"{name}: lora_dropout={dropout!r} in {CONFIG} must be in [0, 1)")
    if not config.get("target_modules") and not config.get("target_parameters"):
        raise AdapterError(f"{name}: {CONFIG} names no target_modules")


def load_weights(files: AdapterFiles) -> dict:
    """The adapter's tensors on CPU, refusing truncated files, pickled code and non-finite values."""
    import torch

    name = files.name
    if files.format == "gguf":
        from webui.adapters.gguf_lora import load_gguf_state
        return load_gguf_state(files)
    if files.format == "safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(files.weights), device="cpu")
        except Exception as e:
            raise AdapterError(f"{name}: {files.weights.name} is corrupt or truncated ({_first_line(e)})") from None
    else:
        try:
            state = torch.load(str(files.weights), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise AdapterError(f"{name}: {files.weights.name} was refused: it holds pickled objects beyond plain "
                               f"tensors, which could run code ({_first_line(e)})") from None
        except Exception as e:
            raise AdapterError(f"{name}: {files.weights.name} is corrupt or truncated ({_first_line(e)})") from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise AdapterError(f"{name}: {files.weights.name} does not hold a mapping of tensor names to tensors")
    if not state:
        raise AdapterError(f"{name}: {files.weights.name} holds no tensors")
    for key, tensor in state.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise AdapterError(f"{name}: non-finite weights (NaN or Inf) in {key}")
    return state


