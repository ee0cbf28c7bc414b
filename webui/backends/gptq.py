"""The GPTQ loader: a GPTQ-quantized model folder (config.json with a GPTQ `quantization_config`, any
bit width and group size GPTQModel supports) loaded through transformers' GPTQ integration, whose
kernels come from GPTQModel (auto-gptq is unmaintained and does not import under transformers 5), on
CUDA when present else CPU. Everything else is the transformers loader's: generation and streaming,
batched generation, and PEFT adapters (apply, weighted stacks, hot-swap, remove, blend) through
webui.adapters.peft_stack, as PEFT wraps GPTQ layers in its GPTQLoraLinear.

What differs: PEFT cannot merge a LoRA into 4-bit weights, so merging is refused with the way out
("merge, then quantize": `python -m webui export --lora A --format gptq`); PEFT's GPTQ LoRA layer does
not take the per-row `adapter_names` of mixed batches, so a small shim routes them to PEFT's own
per-row code. `load_quantized` is also what QLoRA training uses (trainable kernel, float32).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from webui.backends.base import Capabilities, LoadedInfo, ModelLoadError, Progress, UnsupportedOperation, no_progress
from webui.backends.transformers import SAMPLERS, TransformersBackend
from webui.config import ModelSpec

MERGE_REFUSED = ("a LoRA cannot be merged into GPTQ-quantized weights (PEFT cannot: the weights would "
                 "have to be quantized again, with calibration). Merge, then quantize instead: python -m webui "
                 "export --model FLOAT_BASE --lora NAME --format gptq --out DIR merges on the float model and "
                 "quantizes the result; load that folder with --loader gptq and no adapter.")


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

    kwargs = {}
    if trainable:  # only the kernel choice is taken from this; bits, group size... come from the folder
        kwargs["quantization_config"] = GPTQConfig(bits=int(quantization_config(path).get("bits", 4)),
                                                   backend="auto_trainable")
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, device_map={"": device},
                                                local_files_only=True, **kwargs)


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


def _accept_adapter_names(model) -> None:
    """Mixed batches (one adapter per row) on GPTQ layers. PEFT's mixed-batch hook calls each LoRA layer with
    `adapter_names=`, and the per-row code is in their common base (LoraLayer._mixed_batch_forward), but PEFT
    0.21's GPTQLoraLinear.forward(x) does not take the argument (TypeError, measured). Route such calls to that
    code, on these layer instances only (PEFT itself is left as it is)."""
    from peft.tuners.lora.gptq import GPTQLoraLinear

    for module in model.modules():
        if isinstance(module, GPTQLoraLinear) and "forward" not in vars(module):
            module.forward = _RowAdapters(module, module.forward)


class _RowAdapters:
    """A GPTQLoraLinear's forward that also takes `adapter_names` (see _accept_adapter_names)."""

    def __init__(self, layer, plain_forward):
        self.layer, self.plain_forward = layer, plain_forward

    def __call__(self, x, *args, adapter_names=None, **kwargs):
        if adapter_names is None:
            return self.plain_forward(x, *args, **kwargs)
        return self.layer._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)


class GptqBackend(TransformersBackend):
    name = "gptq"
    SETTINGS = ("dtype", "device")
    kernels: tuple = ()  # GPTQModel's kernel class(es) serving the loaded layers; set by load()

    @classmethod
    def preflight(cls, path: Path, spec: ModelSpec) -> None:
        if path.is_file():
            raise ModelLoadError(f"{path.name}: the GPTQ loader reads a model folder, not a single file")
        super().preflight(path, spec)
        if not quantization_config(path):
            raise ModelLoadError(f"{path.name} is not GPTQ-quantized (its config.json has no GPTQ "
                                 "quantization_config): load it with --loader transformers, or make a GPTQ copy with "
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
        layers = quant_layers(self.model).values()
        info.parameters += sum(m.in_features * m.out_features for m in layers)
        self.kernels = tuple(sorted({type(m).__name__ for m in layers}))
        qc = quantization_config(path)
        info.dtype = f"GPTQ {qc.get('bits', '?')}-bit, group {qc.get('group_size', '?')} ({info.dtype} activations)"
        return info

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(loader=self.name, samplers=SAMPLERS, settings=self.SETTINGS, adapters=True,
                            adapter_stack=True, merge=False, mixed_batch=True,
                            extra={"kernels": list(self.kernels),
                                   "merge_instead": "export --format gptq (merge, then quantize)"})

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

    def load_adapter(self, name: str, files, state: dict, report) -> None:
        super().load_adapter(name, files, state, report)
        _accept_adapter_names(self.model)

    # -- merging is impossible on 4-bit weights ---------------------------------------------------------
    def merge_adapters(self) -> None:
        raise UnsupportedOperation(MERGE_REFUSED)

    def unmerge_adapters(self) -> None:
        pass  # nothing can have been merged

    def save_merged(self, out_dir: Path) -> None:
        raise UnsupportedOperation(MERGE_REFUSED)

