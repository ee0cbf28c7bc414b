"""Which modules of a base model a LoRA can target, and their shapes.

`DOCUMENTED_TARGETS` is LoRAX's table of supported target modules per architecture, keyed by
the transformers `model_type`. It is generalized the way PEFT works: any Linear, GPT-2 style Conv1D or
Embedding layer of the base can carry a LoRA, listed architecture or not. A target that names no such
layer in the base is *unsupported* and ignored with a warning (as LoRAX does).

`describe_base` reads the adaptable layers and their (in, out) sizes off a model — a real one, or one
built on the meta device from a config so that checking an adapter needs no weights in memory.
"""
from __future__ import annotations

from dataclasses import dataclass, field

_LLAMA_LIKE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")

DOCUMENTED_TARGETS: dict[str, tuple[str, ...]] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "mixtral": ("q_proj", "k_proj", "v_proj", "o_proj", "lm_head"),
    "gemma": _LLAMA_LIKE[:-1],
    "phi3": ("qkv_proj", "o_proj", "gate_up_proj", "down_proj", "lm_head"),
    "phi": ("q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2", "lm_head"),
    "qwen2": _LLAMA_LIKE,
    "qwen": ("c_attn", "c_proj", "w1", "w2", "lm_head"),
    "cohere": _LLAMA_LIKE,
    "dbrx": ("Wqkv", "out_proj", "lm_head"),
    "gpt2": ("c_attn", "c_proj", "c_fc"),
    "bloom": ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h", "lm_head"),
}


@dataclass
class Layer:
    kind: str       # "linear" | "conv1d" | "embedding"
    in_features: int
    out_features: int


@dataclass
class BaseDescription:
    """What an adapter is checked against: the base's identity and its adaptable layers by module name
    (names as in the transformers model, e.g. `model.layers.0.self_attn.q_proj`)."""

    name: str
    model_type: str
    layers: dict = field(default_factory=dict)  # module name -> Layer
    num_layers: int = 0
    # other modules that hold parameters directly (MoE experts, routers): name -> parameter names. PEFT can
    # target these through `target_parameters`.
    params: dict = field(default_factory=dict)

    @property
    def leaf_names(self) -> set[str]:
        return {n.rsplit(".", 1)[-1] for n in self.layers}

    @property
    def documented(self) -> tuple[str, ...]:
        return DOCUMENTED_TARGETS.get(self.model_type, ())


def _layer_of(module) -> Layer | None:
    import torch.nn as nn  # heavy: reading a config or a GGUF base needs no torch

    if isinstance(module, nn.Linear):
        return Layer("linear", module.in_features, module.out_features)
    if isinstance(module, nn.Embedding):
        return Layer("embedding", module.num_embeddings, module.embedding_dim)
    if type(module).__name__ == "Conv1D" and hasattr(module, "weight"):  # GPT-2: weight is (in, out)
        return Layer("conv1d", module.weight.shape[0], module.weight.shape[1])
    return None


def describe_base(model, name: str) -> BaseDescription:
    """Adaptable layers of a (possibly PEFT-wrapped) transformers model, under their plain names."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    layers, params = {}, {}
    for module_name, module in model.named_modules():
        # PEFT wraps an adapted layer and keeps the original as `.base_layer`; report it under the wrapper's name.
        clean = module_name.replace(".base_layer", "")
        if ".lora_" in clean or clean.endswith((".lora_A", ".lora_B")):
            continue
        layer = _layer_of(module)
        if layer is not None and clean:
            layers[clean] = layer
        elif clean and not clean.endswith(".base_layer") and ".lora_" not in module_name:
            own = tuple(n for n, _ in module.named_parameters(recurse=False))
            if own and clean not in params:
                params[clean] = own
    cfg = getattr(model, "config", None)
    n = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None) or getattr(cfg, "n_layers", 0) or 0
    return BaseDescription(name=name, model_type=getattr(cfg, "model_type", ""), layers=layers, num_layers=int(n),
                           params=params)


def describe_config(config, name: str) -> BaseDescription:
    """Like describe_base, from a transformers config alone: the model is built on the meta device."""
    import torch  # heavy: see _layer_of
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return describe_base(model, name)
