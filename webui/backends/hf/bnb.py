"""bitsandbytes quantization for the transformers loader (`--quantization nf4|fp4|int8`) and for QLoRA
training (`training.quantization`).

It is an option of the transformers loader rather than a loader of its own: a bitsandbytes model is an
ordinary transformers folder quantized while it loads, and everything else — generation, batches, PEFT
adapters (PEFT wraps bitsandbytes' Linear4bit / Linear8bitLt in its own LoRA layers: stacks, hot-swap and
mixed batches work unchanged) — is the transformers loader's. What differs lives here: the
BitsAndBytesConfig, which paths can be quantized, the refusal to merge, and preparing a model for QLoRA.
"""
from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from webui.errors import BadInput

MERGE_REFUSED = ("a LoRA cannot be merged into bitsandbytes-quantized weights without quantizing them again "
                 "(each merge would add rounding error, and the result cannot be saved as a float model). Merge on "
                 "a float copy instead: load the model with --quantization none and merge there, or python -m "
                 "webui export --model FLOAT_BASE --lora NAME --format safetensors --out DIR (the export merges on a "
                 "float copy); the merged folder can then be loaded with --quantization again.")


def bnb_config(quantization: str, compute_dtype) -> BitsAndBytesConfig | None:
    """transformers' BitsAndBytesConfig for a `quantization` choice (None for "none"). 4-bit layers compute in
    `compute_dtype` (float32 on CPU, where bitsandbytes' 4-bit kernels take it; bfloat16/float16 on CUDA)."""
    if quantization == "none":
        return None
    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quantization,
                              bnb_4bit_compute_dtype=compute_dtype)


def check_quantizable(path: Path, quantization: str) -> None:
    """bitsandbytes quantizes a float transformers folder while loading it: refuse a GGUF file (load it on
    llama.cpp) and a folder that is already quantized (GPTQ, bitsandbytes...)."""
    if quantization == "none":
        return
    if path.is_file():
        raise BadInput(f"quantization {quantization}: {path.name} is a GGUF file, which is quantized already; load "
                       "it with --loader llamacpp (or a float transformers folder with --quantization)")
    config = path / "config.json"
    try:
        existing = json.loads(config.read_text()).get("quantization_config") if config.is_file() else None
    except ValueError:
        return  # preflight names the broken config
    if existing:
        method = existing.get("quant_method", "?") if isinstance(existing, dict) else "?"
        raise BadInput(f"quantization {quantization}: {path.name} is already quantized ({method}); load it as it "
                       "is (--quantization none), or quantize its float model instead")


def quantized_layers(model) -> dict:
    """name -> bitsandbytes Linear4bit / Linear8bitLt layer of `model` (PEFT-wrapped or not), plain names."""
    import bitsandbytes as bnb  # optional and slow to import; only quantized models need it

    kinds = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    return {name.replace(".base_layer", ""): m for name, m in model.named_modules() if isinstance(m, kinds)}


def float_parameter_count(model) -> int:
    """Parameters the model stands for: a 4-bit layer stores two weights per byte, which numel() counts once."""
    total = sum(p.numel() for p in model.parameters())
    for layer in quantized_layers(model).values():
        total += layer.in_features * layer.out_features - layer.weight.numel()
    return total


def describe(quantization: str, compute_dtype) -> str:
    """The dtype line of LoadedInfo, e.g. `bitsandbytes nf4 (float32 compute)`."""
    return f"bitsandbytes {quantization} ({str(compute_dtype).removeprefix('torch.')} compute)"


def load(where: str, quantization: str, device: str, dtype, **kwargs):
    """AutoModelForCausalLM quantized by bitsandbytes while loading, on `device` (device_map: quantized models
    cannot be moved with .to() afterwards)."""
    model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, device_map={"": device},
                                                 quantization_config=bnb_config(quantization, dtype), **kwargs)
    for layer in quantized_layers(model).values():
        # On CPUs with AVX512-BF16, bitsandbytes 0.50 repacks a Linear4bit's weights for a faster kernel on its
        # first forward in eval mode without grad, and that format breaks two things we rely on (measured):
        # state_dict() — which PEFT calls when it loads an adapter — unpacks them lossily (the base's logits
        # moved by up to 4.2 afterwards), and the packed kernel has no backward for its input (after one
        # evaluation only the last layers' LoRA got gradients). Keep the plain dequantize-and-matmul path.
        if hasattr(layer, "support_avx512bf16_for_cpu"):
            layer.support_avx512bf16_for_cpu = False
    return model


def training_model(path: Path, device: str, dtype, quantization: str):
    """A bitsandbytes-quantized model ready for QLoRA with PEFT: base weights frozen, non-quantized weights
    (norms, embeddings) in float32 as PEFT's prepare_model_for_kbit_training leaves them, and gradients
    able to flow through every quantized layer."""
    from peft import prepare_model_for_kbit_training

    check_quantizable(path, quantization)
    model = load(str(path), quantization, device, dtype, local_files_only=True)
    # Gradient checkpointing is the trainer's choice (TrainingArguments, non-reentrant), not forced here.
    # (load() keeps bitsandbytes' CPU weight repacking off: its kernel would stop gradients after the first
    # evaluation.) Gradient checkpointing is the trainer's choice (TrainingArguments, non-reentrant).
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
