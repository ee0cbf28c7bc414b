"""Mixed precision of a training run (`training.precision`): the type the base weights are loaded in and the
Trainer computes in, chosen from the setting and the hardware.

auto: bf16 where the hardware computes it: a CUDA GPU from Ampere on, or a CPU with AVX512-BF16 or AMX (torch's CPU
autocast and oneDNN use them: on this project's 2-core EPYC a LoRA step is ~1.4x as fast as in fp32, and the base
weights take half the memory); fp16 autocast with loss scaling on older CUDA GPUs; fp32 on other CPUs. bf16 on a
CPU without those instructions is allowed when asked for (it may be slower than fp32). fp16 on CPU is refused: the
Trainer's fp16 mode is loss-scaled CUDA autocast, and CPUs have no fast fp16 matrix multiply.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from webui.backends.machine import cpu_computes_bf16
from webui.errors import BadInput

__all__ = ["Precision", "cpu_computes_bf16", "resolve"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Precision:
    name: str  # fp32 | bf16 | fp16

    @property
    def dtype(self) -> torch.dtype:
        """The base weights' type (the adapter stays float32: PEFT's autocast_adapter_dtype)."""
        return DTYPES[self.name]

    def trainer_flags(self) -> dict:
        """TrainingArguments' mixed-precision switches."""
        return {"bf16": self.name == "bf16", "fp16": self.name == "fp16"}


def resolve(requested: str, cuda: bool | None = None, bf16_supported: bool | None = None) -> Precision:
    """The precision a run uses; `cuda` / `bf16_supported` default to this machine's. Raises BadInput for a choice
    the hardware cannot run, naming the setting."""
    if cuda is None:
        cuda = torch.cuda.is_available()
    if bf16_supported is None:
        bf16_supported = torch.cuda.is_bf16_supported() if cuda else cpu_computes_bf16()
    if requested == "auto":
        return Precision("bf16" if bf16_supported else "fp16" if cuda else "fp32")
    if requested == "fp16" and not cuda:
        raise BadInput("training.precision fp16: fp16 mixed precision needs a CUDA GPU; on CPU use fp32 "
                       "(or bf16, which torch runs on CPU)")
    if requested == "bf16" and cuda and not bf16_supported:
        raise BadInput("training.precision bf16: this GPU does not support bfloat16 (it needs an Ampere or newer "
                       "GPU); use fp16 or auto")
    if requested not in DTYPES:
        raise BadInput(f"training.precision: {requested!r} is not one of: auto, {', '.join(DTYPES)}")
    return Precision(requested)


def upcast_trainable(model) -> None:
    """Keep every trained weight in float32 under bf16/fp16: fp16's loss scaler refuses fp16 gradients, and bf16
    optimizer updates on bf16 weights lose the small steps (LoRA A/B are float32 already through PEFT; this
    catches modules_to_save and trained biases)."""
    for p in model.parameters():
        if p.requires_grad and p.dtype in (torch.float16, torch.bfloat16):
            p.data = p.data.float()
