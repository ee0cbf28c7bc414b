"""Blends that are exact or say how far off they are. PEFT's `add_weighted_adapter` folds each source's scaling
(alpha/r, alpha/sqrt(r) with rsLoRA, alpha_pattern) into the new factors and assumes the new adapter's own
scale is 1 (it writes r = lora_alpha = the new rank), but it copies the first source's config, so an rsLoRA
source makes the result sqrt(new rank) times too strong; it also ignores DoRA magnitudes and LoRA biases
(PEFT issue 3761). This module wraps it:

- `refuse_unblendable`: DoRA and lora_bias sources are refused with the reason, before anything is written;
- `fix_scale`: the new adapter's config and layers are set to scale 1, what the folded factors assume;
- `deviation`: the new adapter's weight change is compared, module by module, with the weighted stack's
  (scale * B @ A per source, with the scale each layer holds, so rsLoRA and patterns count as PEFT counts them).
  `cat` must match to rounding (else the blend is refused); the other combinations are approximations by
  design (linear mixes factors, svd truncates, ties/dare prune) and their measured deviation is reported.
"""
from __future__ import annotations

import torch
from peft.tuners.lora import LoraLayer

from webui.errors import BadInput

EXACT = ("cat",)  # combinations whose result equals the stack by construction
RECORD = "lora-deck-blend.json"  # written into the blend's folder: sources, weights, combination, deviation


def refuse_unblendable(configs: dict) -> None:
    """`configs`: {adapter name: its PEFT LoraConfig}. Refuse sources no single LoRA can reproduce in a blend."""
    for name, cfg in configs.items():
        if getattr(cfg, "use_dora", False):
            raise BadInput(f"blend refused: {name} is a DoRA adapter. DoRA rescales each weight column by a "
                           "magnitude computed from its own delta, which a sum of LoRA factors cannot reproduce "
                           "(PEFT's add_weighted_adapter drops the magnitudes and writes a wrong adapter). Use the "
                           "weighted stack itself, or merge it into the base (export --format safetensors)")
        if getattr(cfg, "lora_bias", False):
            raise BadInput(f"blend refused: {name} has LoRA biases (lora_bias=True), which PEFT's "
                           "add_weighted_adapter does not combine (the blend would silently lose or garble them). "
                           "Use the weighted stack itself, or merge it into the base (export --format safetensors)")


def _layers(peft_model):
    return [(name, m) for name, m in peft_model.named_modules() if isinstance(m, LoraLayer)]


def fix_scale(peft_model, new_key: str) -> None:
    """Make the new adapter's scale alpha/r = 1 in its config (what is saved) and in its layers (what
    `deviation` measures), whatever rsLoRA setting it copied from its first source."""
    cfg = peft_model.peft_config[new_key]
    cfg.use_rslora = False
    cfg.lora_alpha = cfg.r
    for _, layer in _layers(peft_model):
        if new_key in layer.scaling:
            layer.use_rslora[new_key] = False
            layer.lora_alpha[new_key] = layer.r[new_key]
            layer.scaling[new_key] = 1.0


def _has(layer, key: str) -> bool:
    return key in layer.lora_A or key in layer.lora_embedding_A


def _delta(layer, key: str) -> torch.Tensor:
    """scale * B @ A of one adapter in one layer, in float64. From the factors rather than PEFT's
    `get_delta_weight`, which quantized layers (GPTQ) lack; the same formula on both sides of the comparison
    (a fan_in_fan_out transpose would apply to both alike)."""
    if key in layer.lora_A:
        a, b = layer.lora_A[key].weight, layer.lora_B[key].weight
    else:
        a, b = layer.lora_embedding_A[key], layer.lora_embedding_B[key]
    return (b.double() @ a.double()) * float(layer.scaling[key])


def deviation(peft_model, weights: dict[str, float], new_key: str) -> tuple[float, str]:
    """(largest relative difference ||new delta - stack delta|| / ||stack delta|| over the modules, that
    module's name) between the new adapter and sum_k w_k * delta_k of the sources (keys as PEFT knows them),
    each at its own scale (the caller sets every source's scale to 1 first)."""
    worst, where = 0.0, ""
    with torch.no_grad():
        for name, layer in _layers(peft_model):
            sources = [(k, w) for k, w in weights.items() if _has(layer, k)]
            if not sources:
                continue
            want = sum(float(w) * _delta(layer, k) for k, w in sources)
            got = _delta(layer, new_key) if _has(layer, new_key) else torch.zeros_like(want)
            norm = float(want.norm())
            rel = float((got - want).norm()) / norm if norm else float(got.norm() > 0)
            if rel > worst:
                worst, where = rel, name
    return worst, where


def tolerance(dtype: torch.dtype) -> float:
    """What rounding alone can explain for factors stored in `dtype` (a few ulps, at least 1e-5)."""
    return max(1e-5, 8 * torch.finfo(dtype).eps)
