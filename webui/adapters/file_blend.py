"""A weighted stack written as one PEFT adapter from the adapters' files alone, no base model: PEFT's `cat`
combination done on the tensors. Per module the factors are concatenated along the rank, each source's weight
and PEFT scale (alpha/r, alpha/sqrt(r) with rsLoRA, alpha_pattern) folded into its B, and the new adapter's
scale set to 1 (lora_alpha = r per module, through rank_pattern / alpha_pattern where ranks differ), so
B_cat @ A_cat = sum_i w_i * scale_i * B_i @ A_i exactly.

Why not Engine.blend_adapters: it runs PEFT's add_weighted_adapter on a loaded base, and a remote engine's base
is not here. Engines that serve one adapter per request (vLLM, SGLang) get a stack as such a blend.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors.torch import save_file

from webui.adapters.exact_blend import refuse_unblendable
from webui.adapters.files import load_weights, read_adapter
from webui.adapters.gguf_lora import peft_scale
from webui.adapters.types import CONFIG, SAFETENSORS, split_key
from webui.atomic import write_into_place
from webui.errors import BadInput

_PREFIX = "base_model.model."  # how PEFT names the saved tensors


def _pairs(folder: Path) -> tuple[dict, dict[str, tuple[torch.Tensor, torch.Tensor, float]]]:
    """(config, {module: (A, B, scale)}) of one adapter folder."""
    files = read_adapter(folder)
    refuse_unblendable({files.name: SimpleNamespace(**files.config)})
    parts: dict[str, dict] = {}
    for key, tensor in load_weights(files).items():
        module, part = split_key(key)
        if part not in ("lora_A", "lora_B"):
            raise BadInput(f"{files.name}: {module} ({part or 'a saved whole module'}) cannot be stacked into one "
                           "LoRA; select the adapters one at a time")
        parts.setdefault(module, {})[part] = tensor.float()
    return files.config, {m: (p["lora_A"], p["lora_B"], peft_scale(files.config, m, p["lora_A"].shape[0]))
                          for m, p in parts.items()}


def cat_blend(sources: list[tuple[Path, float]], out: Path) -> Path:
    """Write the stack [(adapter folder, weight), ...] as one adapter folder `out` (atomically: a temporary
    folder beside it, renamed into place)."""
    configs, modules = [], {}
    for folder, weight in sources:
        config, pairs = _pairs(Path(folder))
        configs.append(config)
        for module, (a, b, scale) in pairs.items():
            a_list, b_list = modules.setdefault(module, ([], []))
            a_list.append(a)
            b_list.append(b * (weight * scale))
    if not modules:
        raise BadInput("nothing to blend: the adapters hold no LoRA factors")
    tensors, ranks = {}, {}
    for module, (a_list, b_list) in modules.items():
        tensors[f"{_PREFIX}{module}.lora_A.weight"] = torch.cat(a_list, 0).contiguous()
        tensors[f"{_PREFIX}{module}.lora_B.weight"] = torch.cat(b_list, 1).contiguous()
        ranks[module] = sum(a.shape[0] for a in a_list)
    r = max(set(ranks.values()), key=list(ranks.values()).count)  # the commonest rank; the rest by pattern
    pattern = {re.escape(m): k for m, k in ranks.items() if k != r}
    config = {**configs[0], "r": r, "lora_alpha": r, "rank_pattern": pattern, "alpha_pattern": dict(pattern),
              "use_rslora": False, "use_dora": False, "layers_to_transform": None, "layers_pattern": None,
              "init_lora_weights": True, "modules_to_save": None,
              "target_modules": sorted({m.rsplit(".", 1)[-1] for m in modules})}
    out = Path(out)
    with write_into_place(out) as tmp:
        save_file(tensors, str(tmp / SAFETENSORS), metadata={"format": "pt"})
        (tmp / CONFIG).write_text(json.dumps(config, indent=2))
    return out
