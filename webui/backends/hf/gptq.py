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

from pathlib import Path

import torch
from peft.tuners.lora.gptq import GPTQLoraLinear
from transformers import AutoModelForCausalLM, GPTQConfig

from webui.adapters.targets import Layer, describe_base
from webui.backends import embedded, machine
from webui.backends.base import SAMPLERS, Capabilities, LoadedInfo
from webui.backends.hf.gptq_quantize import gptqmodel_env, quantization_config
from webui.backends.hf.transformers import TransformersBackend, pick_device
from webui.errors import BadInput, LoadFailed, Unsupported
from webui.options.config import ModelSpec
from webui.progress import Progress, no_progress

MERGE_REFUSED = ("a LoRA cannot be merged into GPTQ-quantized weights (PEFT cannot: the weights would "
                 "have to be quantized again, with calibration). Merge, then quantize instead: python -m webui "
                 "export --model FLOAT_BASE --lora NAME --format gptq --out DIR merges on the float model and "
                 "quantizes the result; load that folder with --loader gptq and no adapter.")


def load_quantized(path: Path, device: str, dtype, trainable: bool = False):
    """AutoModelForCausalLM with GPTQModel's kernels on `device`. `trainable`: the kernel that back-propagates
    (for QLoRA; use dtype float32 on CPU) instead of the fastest inference kernel."""
    gptqmodel_env()
    kwargs = {}
    if trainable:  # only the kernel choice is taken from this; bits, group size... come from the folder
        kwargs["quantization_config"] = GPTQConfig(bits=int(quantization_config(path).get("bits", 4)),
                                                   backend="auto_trainable")
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, device_map={"": device},
                                                local_files_only=True, **kwargs)


def quant_layers(model) -> dict:
    """name -> GPTQModel quantized linear layer of `model` (PEFT-wrapped or not), under plain names."""
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear  # optional dependency; reads GPTQMODEL_CPU_WORKERS

    gptqmodel_env()
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
    settings = ("dtype", "device")
    requires = ("gptqmodel",)
    embedded_by_default = False  # quantizing the embedded model takes minutes: only when asked for
    kernels: tuple = ()  # GPTQModel's kernel class(es) serving the loaded layers; set by load()

    # -- what the registry asks ------------------------------------------------------------------
    @classmethod
    def claims(cls, path: Path) -> bool:
        return path.is_dir() and bool(quantization_config(path))

    @classmethod
    def embedded(cls, models_dir: Path, progress: Progress | None = None) -> Path:
        return embedded.ensure_gptq_folder(models_dir, progress)

    @classmethod
    def training_model(cls, path: Path, device: str, dtype, quantization: str = "none"):
        """QLoRA on GPTQ: the 4-bit weights stay frozen behind GPTQModel's trainable kernel; activations in
        float32 (the kernel's CPU path needs it)."""
        if quantization != "none":
            raise BadInput(f"training.quantization {quantization}: {path.name} is GPTQ-quantized already and trains "
                           "as QLoRA on its own 4-bit weights; set training.quantization: none")
        return load_quantized(path, device, torch.float32, trainable=True)

    @classmethod
    def training_lora_config(cls, lora_config, model):
        return expand_all_linear(lora_config, model)

    @classmethod
    def memory_need(cls, path: Path, spec: ModelSpec) -> int:
        """The 4-bit layers stay packed as stored; the rest (embeddings, norms) is small beside them."""
        if not Path(path).is_dir() or pick_device(spec.device) != "cpu":
            return 0
        return machine.load_need_file(path)

    @classmethod
    def preflight(cls, path: Path, spec: ModelSpec) -> None:
        if path.is_file():
            raise LoadFailed(f"{path.name}: the GPTQ loader reads a model folder, not a single file")
        super().preflight(path, spec)
        if not quantization_config(path):
            raise LoadFailed(f"{path.name} is not GPTQ-quantized (its config.json has no GPTQ "
                                 "quantization_config): load it with --loader transformers, or make a GPTQ copy with "
                                 "python -m webui export --model NAME --format gptq --out DIR")
        try:
            gptqmodel_env()
            import gptqmodel  # noqa: F401  (optional dependency: a broken install is refused before unloading)
        except Exception as e:  # missing, or broken against this torch
            raise LoadFailed(f"the GPTQ loader needs GPTQModel, which cannot be imported: {e}") from None

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
        return Capabilities(loader=self.name, samplers=SAMPLERS, settings=self.settings, adapters=True,
                            adapter_stack=True, merge=False, mixed_batch=True,
                            extra={"kernels": list(self.kernels),
                                   "merge_instead": "export --format gptq (merge, then quantize)"})

    def describe_base(self):
        """The transformers description plus the quantized linear layers (GPTQModel's QuantLinear is not an
        nn.Linear, so the generic reader does not see it), with their float (in, out) sizes."""
        if self._base_description is None:
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
        raise Unsupported(MERGE_REFUSED)

    def unmerge_adapters(self) -> None:
        pass  # nothing can have been merged

    def save_merged(self, out_dir: Path) -> None:
        raise Unsupported(MERGE_REFUSED)

