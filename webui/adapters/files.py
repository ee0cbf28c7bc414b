"""Reading a PEFT adapter folder safely: `adapter_config.json` plus `adapter_model.safetensors` or
`adapter_model.bin` (safetensors wins when both exist, as in LoRAX; `.bin` is read only with
`torch.load(weights_only=True)`, so a pickle that would run code is refused). Names given by users and
API requests resolve only inside the adapters folder. A GGUF LoRA (a `.gguf` file, or a folder holding one
and no adapter_config.json) is read by webui.adapters.gguf_lora for the llama.cpp loader. Every problem
raises BadInput with a message that names the file and the problem.
"""
from __future__ import annotations

import json
import math
import os
import pickle
import re
from pathlib import Path

from webui.adapters.gguf_lora import load_gguf_state, read_gguf_adapter
from webui.adapters.types import BIN, CONFIG, SAFETENSORS, AdapterFiles
from webui.errors import BadInput, NotFound, first_line
from webui.paths import inside

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+\-]{0,127}$")


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
        raise BadInput(f"adapter name {name!r} is not allowed: use the name of a folder inside {loras_dir} "
                           "(letters, digits, '.', '_', '+', '-'); names cannot leave the adapters folder")


def resolve_adapter(name: str, loras_dir: Path) -> Path:
    """An adapter name → its folder (or GGUF LoRA file) inside `loras_dir`. A name that would leave the adapters
    folder (a separator, '..', a symlink pointing out) is refused."""
    loras_dir = Path(loras_dir)
    check_adapter_name(name, loras_dir)
    path = loras_dir / name
    if not inside(loras_dir, path):
        raise BadInput(f"adapter {name!r} escapes the adapters folder {loras_dir}")
    return _existing(path, name, loras_dir)


def locate_adapter(adapter: str, loras_dir: Path, anywhere: bool = False) -> Path:
    """A name in `loras_dir`, or a path to an adapter (LoRAX's `local` source, the CLI). A path must lie inside
    `loras_dir` unless `anywhere` (the command line, whose user names folders of their own)."""
    if "/" not in adapter and os.sep not in adapter:
        return resolve_adapter(adapter, loras_dir)
    path = Path(adapter).expanduser()
    if not path.is_absolute() and (Path(loras_dir) / path).exists():
        path = Path(loras_dir) / path
    if not anywhere and not inside(loras_dir, path):
        raise BadInput(f"adapter {adapter!r} escapes the adapters folder {loras_dir}: a path must lie inside it")
    return _existing(path.resolve(), adapter, Path(loras_dir))


def _existing(path: Path, name: str, loras_dir: Path) -> Path:
    if not (path.is_dir() or (path.is_file() and path.suffix == ".gguf")):
        have = list_adapters(loras_dir)
        hint = f"; adapters in {loras_dir}: {', '.join(have)}" if have else f"; {loras_dir} holds no adapters"
        raise NotFound(f"adapter not found: {name}{hint}")
    return path


def read_adapter(path: Path, name: str | None = None) -> AdapterFiles:
    """Read and sanity-check the config; locate the weights file. Does not load tensors."""
    path = Path(path)
    name = name or path.name
    cfg_file = path / CONFIG
    if path.suffix == ".gguf" or (not cfg_file.is_file() and any(path.glob("*.gguf"))):
        return read_gguf_adapter(path, name)
    if not cfg_file.is_file():
        raise BadInput(f"{name}: {CONFIG} is missing — not a PEFT adapter folder")
    try:
        config = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise BadInput(f"{name}: {CONFIG} is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise BadInput(f"{name}: {CONFIG} must hold a JSON object")
    check_lora_config(name, config)
    if (path / SAFETENSORS).is_file():
        weights, fmt = path / SAFETENSORS, "safetensors"
    elif (path / BIN).is_file():
        weights, fmt = path / BIN, "bin"
    else:
        raise BadInput(f"{name}: no weights file ({SAFETENSORS} or {BIN})")
    return AdapterFiles(name=name, path=path, config=config, weights=weights, format=fmt,
                        size=weights.stat().st_size)


def check_lora_config(name: str, config: dict) -> None:
    """Refuse configs whose LoRA numbers make no sense (before any tensor is read)."""
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise BadInput(f"{name}: a {peft_type} adapter; only LoRA adapters are supported")
    r = config.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise BadInput(f"{name}: rank r={r!r} in {CONFIG} must be a positive integer")
    alpha = config.get("lora_alpha", r)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha) or alpha <= 0:
        raise BadInput(f"{name}: lora_alpha={alpha!r} in {CONFIG} must be a positive number")
    dropout = config.get("lora_dropout", 0.0) or 0.0
    if not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise BadInput(f"{name}: lora_dropout={dropout!r} in {CONFIG} must be in [0, 1)")
    if not config.get("target_modules") and not config.get("target_parameters"):
        raise BadInput(f"{name}: {CONFIG} names no target_modules")


def load_weights(files: AdapterFiles) -> dict:
    """The adapter's tensors on CPU, refusing truncated files, pickled code and non-finite values."""
    import torch  # heavy: listing and naming adapters must not pay for it
    from safetensors.torch import load_file

    name = files.name
    if files.format == "gguf":
        return load_gguf_state(files)
    if files.format == "safetensors":
        try:
            state = load_file(str(files.weights), device="cpu")
        except Exception as e:
            raise BadInput(f"{name}: {files.weights.name} is corrupt or truncated ({first_line(e)})") from None
    else:
        try:
            state = torch.load(str(files.weights), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise BadInput(f"{name}: {files.weights.name} was refused: it holds pickled objects beyond plain "
                               f"tensors, which could run code ({first_line(e)})") from None
        except Exception as e:
            raise BadInput(f"{name}: {files.weights.name} is corrupt or truncated ({first_line(e)})") from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise BadInput(f"{name}: {files.weights.name} does not hold a mapping of tensor names to tensors")
    if not state:
        raise BadInput(f"{name}: {files.weights.name} holds no tensors")
    for key, tensor in state.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise BadInput(f"{name}: non-finite weights (NaN or Inf) in {key}")
    return state


