"""Files in and out of adapter surgery: model weights read one tensor at a time, and the new adapter folder
written in one step.

`ModelTensors(folder)` reads a transformers safetensors folder (one `model.safetensors`, or shards listed by
`model.safetensors.index.json`) through `safetensors.safe_open`: each shard is memory-mapped and `get(key)`
copies out that one tensor, so extracting from two 1B models holds a layer or two, never a whole model.

`write_lora(...)` stages the PEFT folder (adapter_config.json, adapter_model.safetensors, surgery.json, a model
card) under a hidden name in the loras dir and moves it into place with webui.atomic.write_into_place, so a
crash or a cancel leaves the old adapter (or nothing), never half a folder under the new name.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from webui.adapters.files import check_adapter_name
from webui.adapters.model_card import CARD, adapter_card
from webui.adapters.types import CONFIG, SAFETENSORS
from webui.atomic import dest_lock, write_into_place
from webui.errors import BadInput, NotFound

RECORD = "surgery.json"  # what was done and each layer's error, beside the weights (the card says it in words)
_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"
_DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2}


class ModelTensors:
    """The tensors of a transformers model folder, read lazily. Raises BadInput for a folder without
    safetensors weights (a .bin checkpoint would have to be unpickled whole; a GGUF is not a weight folder).

    Each read opens its shard and closes it again: a handle kept open keeps every page read through it mapped,
    which counted both whole models in the process's resident memory by the end of an extract (measured here:
    +650 MB of RssFile for two 322 MB models; with a handle per read, none)."""

    def __init__(self, folder: Path):
        from safetensors import safe_open  # torch-heavy callers only

        self._open = safe_open
        self.folder = Path(folder)
        if (self.folder / _INDEX).is_file():
            weight_map = json.loads((self.folder / _INDEX).read_text(encoding="utf-8")).get("weight_map") or {}
        elif (self.folder / _SINGLE).is_file():
            with safe_open(str(self.folder / _SINGLE), framework="pt", device="cpu") as f:
                weight_map = dict.fromkeys(f.keys(), _SINGLE)
        else:
            raise BadInput(f"{self.folder.name}: no {_SINGLE} or {_INDEX}; adapter surgery reads a transformers "
                           "safetensors folder (a GGUF or a .bin checkpoint cannot be read layer by layer)")
        self.weight_map: dict[str, str] = weight_map

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def __contains__(self, key: str) -> bool:
        return key in self.weight_map

    def _shard(self, key: str):
        if key not in self.weight_map:
            raise BadInput(f"{self.folder.name}: has no tensor {key}")
        return self._open(str(self.folder / self.weight_map[key]), framework="pt", device="cpu")

    def shape(self, key: str) -> tuple[int, ...]:
        with self._shard(key) as f:
            return tuple(f.get_slice(key).get_shape())

    def nbytes(self, key: str) -> int:
        with self._shard(key) as f:
            part = f.get_slice(key)
            count = 1
            for n in part.get_shape():
                count *= n
            return count * _DTYPE_BYTES.get(part.get_dtype(), 4)

    def get(self, key: str) -> torch.Tensor:
        with self._shard(key) as f:
            return f.get_tensor(key)

    def config(self) -> dict:
        try:
            return json.loads((self.folder / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise BadInput(f"{self.folder.name}: config.json is missing or broken ({e})") from None


def find_model(name: str, models_dir: Path, what: str = "model") -> Path:
    """A model folder from a models-dir name, a path, or a hub id as the adapter records it (`org/name`, which
    download-model.py stores as `models/org_name`)."""
    models_dir = Path(models_dir)
    candidates = [Path(name).expanduser(), models_dir / name, models_dir / name.replace("/", "_"),
                  models_dir / Path(name).name]
    for c in candidates:
        if c.is_dir() and (c / "config.json").is_file():
            return c
    raise NotFound(f"{what} not found: {name} (looked in {models_dir} and as a path); "
                   "give it with --model (a models-dir name or a folder path)")


def write_lora(loras_dir: Path, name: str, config: dict, tensors: dict[str, torch.Tensor], record: dict,
               card_section: list[str], force: bool = False) -> Path:
    """Write loras_dir/name as a PEFT LoRA folder (see the module docstring). An existing folder of that name is
    refused unless `force`, then replaced in one step."""
    loras_dir = Path(loras_dir)
    check_adapter_name(name, loras_dir)
    dest = loras_dir / name
    from safetensors.torch import save_file

    with dest_lock(dest):
        if dest.exists() and not force:
            raise BadInput(f"{dest} already exists: pick another --out, or --force to replace it")
        with write_into_place(dest, replace=force) as staging:
            (staging / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(staging / SAFETENSORS),
                      metadata={"format": "pt"})
            (staging / RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
            card = adapter_card(staging)
            text = str(card).replace(f"# {staging.name}", f"# {name}", 1)
            (staging / CARD).write_text(text.rstrip("\n") + "\n\n" + "\n".join(card_section) + "\n",
                                        encoding="utf-8")
    return dest


def lora_config(source: dict | None, targets: list[str], ranks: dict[str, int], base: str,
                fan_in_fan_out: bool = False) -> dict:
    """A plain PEFT LoRA config whose every layer has scale 1: lora_alpha = r (the largest layer rank), and a
    layer of another rank gets rank_pattern and alpha_pattern entries equal to its rank. Runtimes that read one
    alpha and r for the whole adapter (and take each layer's rank from its tensors) then scale it by 1 too,
    so the factors mean the same thing everywhere. Keys from `source` that stay true (task type, bias 'none',
    layers_to_transform, modules_to_save) are kept; the variant switches (DoRA, rsLoRA, ...) are off."""
    r = max(ranks.values())
    other = {m: k for m, k in sorted(ranks.items()) if k != r}
    keep = ("task_type", "modules_to_save", "layers_to_transform", "layers_pattern", "revision")
    cfg = {k: source[k] for k in keep if source and source.get(k) is not None}
    cfg.update({"peft_type": "LORA", "task_type": cfg.get("task_type") or "CAUSAL_LM", "r": r, "lora_alpha": r,
                "rank_pattern": other, "alpha_pattern": dict(other), "target_modules": sorted(set(targets)),
                "base_model_name_or_path": base, "lora_dropout": 0.0, "bias": "none", "use_rslora": False,
                "use_dora": False, "fan_in_fan_out": fan_in_fan_out, "init_lora_weights": True,
                "inference_mode": True})
    return cfg


def peft_key(module: str, part: str) -> str:
    """The key PEFT saves a LoRA factor under: base_model.model.<module>.lora_A.weight."""
    return f"base_model.model.{module}.{part}.weight"
