"""The GPTQ loader: a GPTQ-quantized model folder (config.json with a GPTQ `quantization_config`, any
bit width and group size GPTQModel supports) loaded through transformers' GPTQ integration, whose
kernels come from GPTQModel (auto-gptq is unmaintained and does not import under transformers 5), on
CUDA when present else CPU. Everything else is the transformers loader's: generation and streaming,
batched generation, and PEFT adapters (apply, weighted stacks, hot-swap, remove, blend) through
webui.adapters.peft_stack, as PEFT wraps GPTQ layers in its GPTQLoraLinear.

What differs: PEFT cannot merge a LoRA into 4-bit weights, so merging is refused with the way out
("merge, then quantize": `python -m webui export --lora A --format gptq`), and PEFT's GPTQ LoRA layer
does not take per-row `adapter_names`, so requests for different adapters run group by group rather
than in one mixed batch. `load_quantized` is also what QLoRA training uses (trainable kernel, float32).
"""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path

from webui.backends.base import Capabilities, LoadedInfo, ModelLoadError, Progress, UnsupportedOperation, no_progress
from webui.backends.transformers import SAMPLERS, TransformersBackend
from webui.config import GenerationParams, ModelSpec

MERGE_REFUSED = ("a LoRA cannot be merged into GPTQ 4-bit weights (PEFT refuses: the quantized weights "
                 "cannot absorb the change). Merge, then quantize instead: python -m webui export --model "
                 "FLOAT_BASE --lora NAME --format gptq --out DIR merges on the float model and quantizes the "
                 "result; load that folder with --loader gptq and no adapter.")


def gptqmodel_env() -> None:
    """GPTQModel sizes its CPU thread pool from GPTQMODEL_CPU_WORKERS when it is imported; its default is
    too small on few-core machines (measured: it crashes on 2 cores), so use the core count unless the
    user chose. Call before the first import of gptqmodel."""
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(os.cpu_count() or 1))


def quantization_config(path: Path) -> dict:
    """The GPTQ `quantization_config` of a model folder ({} when there is none)."""
    try:
        qc = json.loads((Path(path) / "config.json").read_text()).get("quantization_config") or {}
    except (OSError, ValueError):
        return {}
    return qc if str(qc.get("quant_method", "")).lower() == "gptq" else {}


def load_quantized(path: Path, device: str, dtype, trainable: bool = False):
    """AutoModelForCausalLM with GPTQModel's kernels on `device`. `trainable`: the kernel that back-propagates
    (for QLoRA; use dtype float32 on CPU) instead of the fastest inference kernel."""
    gptqmodel_env()
    from transformers import AutoModelForCausalLM, GPTQConfig

    qc = quantization_config(path)
    config = GPTQConfig(bits=int(qc.get("bits", 4)), backend="auto_trainable" if trainable else "auto")
    return AutoModelForCausalLM.from_pretrained(str(path), quantization_config=config, dtype=dtype,
                                                device_map={"": device}, local_files_only=True)


def quant_layers(model) -> dict:
    """name -> GPTQModel quantized linear layer of `model` (PEFT-wrapped or not), under plain names."""
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear

    return {name.replace(".base_layer", ""): m for name, m in model.named_modules() if isinstance(m, BaseQuantLinear)}


def expand_all_linear(lora_config, model):
    """PEFT's `target_modules="all-linear"` finds nn.Linear layers only, and GPTQModel's quantized layers are
    not nn.Linear (measured: PEFT then finds no target at all). Name them explicitly, as PEFT would have."""
    targets = lora_config.target_modules
    if isinstance(targets, str) and targets.lower() == "all-linear":
        lora_config.target_modules = sorted({name.rsplit(".", 1)[-1] for name in quant_layers(model)})
    return lora_config


class GptqBackend(TransformersBackend):
    name = "gptq"
    SETTINGS = ("dtype", "device")

    @classmethod
    def preflight(cls, path: Path, spec: ModelSpec) -> None:
        if path.is_file():
            raise ModelLoadError(f"{path.name}: the GPTQ loader reads a model folder, not a single file")
        super().preflight(path, spec)
        if not quantization_config(path):
            raise ModelLoadError(f"{path.name} is not GPTQ-quantized (its config.json has no GPTQ quantization_config): "
                                 "load it with --loader transformers, or make a GPTQ copy with "
                                 "python -m webui export --model NAME --format gptq --out DIR")
        try:
            gptqmodel_env()
            import gptqmodel  # noqa: F401
        except Exception as e:  # missing, or broken against this torch
            raise ModelLoadError(f"the GPTQ loader needs GPTQModel, which cannot be imported: {e}") from None

    def _from_pretrained(self, where: str, dtype, **kwargs):
        return load_quantized(Path(where), self.device, dtype)

    def load(self, path: Path, spec: ModelSpec, progress: Progress = no_progress) -> LoadedInfo:
        info = super().load(path, spec, progress)
        # 4-bit weights are packed buffers, not parameters: count what they stand for
        info.parameters += sum(m.in_features * m.out_features for m in quant_layers(self.model).values())
        qc = quantization_config(path)
        info.dtype = f"GPTQ {qc.get('bits', '?')}-bit, group {qc.get('group_size', '?')} ({info.dtype} activations)"
        return info

    @property
    def capabilities(self) -> Capabilities:
        kernels = sorted({type(m).__name__ for m in quant_layers(self.model).values()}) if self.model is not None else []
        return Capabilities(loader=self.name, samplers=SAMPLERS, settings=self.SETTINGS, adapters=True,
                            adapter_stack=True, merge=False, mixed_batch=False,
                            extra={"kernels": kernels, "merge_instead": "export --format gptq (merge, then quantize)"})

    def describe_base(self):
        """The transformers description plus the quantized linear layers (GPTQModel's QuantLinear is not an
        nn.Linear, so the generic reader does not see it), with their float (in, out) sizes."""
        if self._base_description is None:
            from webui.adapters.targets import Layer, describe_base

            desc = describe_base(self.model, self.info.name)
            for name, layer in quant_layers(self.model).items():
                desc.layers[name] = Layer("linear", layer.in_features, layer.out_features)
                desc.params.pop(name, None)
            self._base_description = desc
        return self._base_description

    # -- merging is impossible on 4-bit weights ---------------------------------------------------------
    def merge_adapters(self) -> None:
        raise UnsupportedOperation(MERGE_REFUSED)

    def unmerge_adapters(self) -> None:
        pass  # nothing can have been merged

    def save_merged(self, out_dir: Path) -> None:
        raise UnsupportedOperation(MERGE_REFUSED)

    def stream_batch(self, prompts: list[str], params: GenerationParams, adapter_names: list | None = None,
                     cancel: threading.Event | None = None):
        """Batched generation with the active stack for every row. PEFT's GPTQLoraLinear.forward takes no
        `adapter_names` (measured with PEFT 0.21: TypeError), so one adapter per row is refused here and the
        scheduler (capabilities.mixed_batch=False) runs each adapter's requests as their own batch."""
        if adapter_names and any(adapter_names):
            raise UnsupportedOperation("the gptq loader cannot mix adapters within one batch")
        return super().stream_batch(prompts, params, None, cancel)
