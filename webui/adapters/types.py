"""The shapes every adapter module shares: an adapter's files on disk (`AdapterFiles`), the PEFT file names, and
how a PEFT tensor key splits into module and LoRA part. A leaf module, so that reading files (files.py),
GGUF LoRAs (gguf_lora.py) and the compatibility report (inspect.py) can all use them without importing
each other.
"""
from __future__ import annotations

import re
import typing
from dataclasses import dataclass
from pathlib import Path

from webui.options.commands import Combination

CONFIG = "adapter_config.json"
SAFETENSORS = "adapter_model.safetensors"
BIN = "adapter_model.bin"
# PEFT add_weighted_adapter's combination types that blends offer ('cat' first: the exact one, the default),
# named once with the blend options (webui/options/commands.py).
COMBINATIONS = typing.get_args(Combination)

_PREFIX = "base_model.model."
_LORA_PART = re.compile(r"\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)(\.|$)")


@dataclass
class AdapterFiles:
    name: str
    path: Path
    config: dict
    weights: Path
    format: str  # "safetensors" | "bin" | "gguf"
    size: int

    def signature(self) -> tuple:
        """Changes when the files change: a cached adapter is reloaded then."""
        return tuple((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in (self.path / CONFIG, self.weights))


def split_key(key: str) -> tuple[str, str]:
    """'base_model.model.model.layers.0.q_proj.lora_A.weight' → ('model.layers.0.q_proj', 'lora_A');
    non-LoRA tensors (modules_to_save) → (module path, '')."""
    key = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
    key = key.replace(".base_layer.", ".")  # PEFT nests wrappers when it targets several parameters of one module
    m = _LORA_PART.search(key)
    if m:
        return key[:m.start()], m.group(1)
    return key.rsplit(".", 1)[0], ""
