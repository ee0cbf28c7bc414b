"""Merging LoRA adapters into a transformers base one tensor at a time, so an export needs about one tensor of
memory beyond what it writes, not two copies of the model (PEFT's `merge_and_unload` on a loaded float copy
held 3.4x the model's size at 1.1B; a 7B merge would need ~50 GB).

The base is read through `ModelTensors` (safetensors, memory-mapped, one handle per read so pages read are not
kept); each tensor an adapter changes gets sum_i w_i * scale_i * B_i @ A_i added in float32, in the stack's order
and the way PEFT's `get_delta_weight` computes it (B @ A, transposed for fan_in_fan_out layers and for embedding
LoRAs, times w * alpha / r), then is cast back to the base's own dtype: the same numbers PEFT's merge on a
float32 copy gives, saved in the base's dtype as the export always did.

What this does not reproduce falls back to the loaded-model merge (`plan_merge` raises NotStreamable with the
reason): DoRA (its magnitude renormalizes whole weights), LoRA biases, saved whole modules (modules_to_save),
adapters on tied embeddings, a base stored as .bin or GGUF, and keys that do not match the base's names.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from webui.adapters.gguf_lora import peft_scale
from webui.adapters.surgery.folders import ModelTensors
from webui.adapters.types import split_key
from webui.backends import machine
from webui.errors import Incompatible
from webui.progress import Progress, no_progress

SHARD_BYTES = 512 << 20  # output shard size: safetensors' save_file holds a shard (and a bytes copy) in memory
INDEX = "model.safetensors.index.json"
# a folder's weights and what describes them; every other top-level file (config, tokenizer, generation config,
# chat template) is copied as it is
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".h5", ".msgpack")
_NOT_COPIED = {INDEX, "pytorch_model.bin.index.json", "README.md", ".gitattributes"}


class NotStreamable(Exception):
    """The merge needs the loaded model (the reason says why); not a user error."""


@dataclass
class Change:
    a: torch.Tensor        # (r, in)
    b: torch.Tensor        # (out, r)
    factor: float          # stack weight * PEFT scale
    transposed: bool       # the delta is (B @ A).T: fan_in_fan_out layers and embedding LoRAs


@dataclass
class MergePlan:
    """Per base tensor key, the changes to add, in stack order, and the tensors adapters replace whole."""
    changes: dict[str, list[Change]] = field(default_factory=dict)
    replaced: dict[str, torch.Tensor] = field(default_factory=dict)

    def base(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        """The base's `key` as the adapters see it: replaced whole where an adapter stores it (the last one wins,
        as loading them in turn does)."""
        found = self.replaced.get(key)
        return tensor if found is None else found.to(tensor.dtype)

    def delta(self, key: str) -> torch.Tensor | None:
        """sum of the changes to `key` in float32, or None when no adapter touches it."""
        total = None
        for c in self.changes.get(key, ()):
            d = c.b.float() @ c.a.float()
            d = (d.T if c.transposed else d) * c.factor
            total = d if total is None else total + d
        return total

    def merged(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` (the base's `key`) with its changes added, in its own dtype."""
        tensor = self.base(key, tensor)
        changes = self.changes.get(key)
        if not changes:
            return tensor
        merged = tensor.float()
        for c in changes:  # one at a time, as PEFT merges an adapter stack
            d = c.b.float() @ c.a.float()
            merged = merged + (d.T if c.transposed else d) * c.factor
        if not torch.isfinite(merged).all():
            raise Incompatible(f"merge refused: non-finite values in {key} (the adapter's weights overflow)")
        return merged.to(tensor.dtype)


def _groups(state: dict, name: str) -> tuple[dict[str, dict], dict[str, torch.Tensor]]:
    """{module: {LoRA part: tensor}}, and {base key: tensor} the adapter stores whole in its target's place (PEFT
    saves a targeted embedding's weight too, and loading the adapter writes it into the base)."""
    groups: dict[str, dict] = {}
    replaced: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        module, part = split_key(key)
        if part == "lora_magnitude_vector":
            raise NotStreamable(f"{name} is a DoRA adapter")
        if not part and ".base_layer." in key:
            replaced[f"{module}.{key.rsplit('.', 1)[-1]}"] = tensor
            continue
        if not part:
            raise NotStreamable(f"{name} saves whole modules (modules_to_save)")
        if key.endswith(".bias"):
            raise NotStreamable(f"{name} has LoRA biases")
        groups.setdefault(module, {})[part] = tensor
    return groups, replaced


def plan_merge(adapters: list[tuple], base: ModelTensors) -> MergePlan:
    """The plan for `adapters` [(AdapterFiles, state, weight), ...] on `base`. Raises Incompatible for an adapter
    whose change does not fit the base's tensor, NotStreamable for what only the loaded-model merge does."""
    config = base.config()
    tied = bool(config.get("tie_word_embeddings", False)) or "lm_head.weight" not in base
    plan = MergePlan()
    for files, state, weight in adapters:
        if files.format != "safetensors" and files.format != "bin":
            raise NotStreamable(f"{files.name} is a {files.format} file")
        groups, replaced = _groups(state, files.name)
        for key, tensor in replaced.items():
            if key not in base or tuple(base.shape(key)) != tuple(tensor.shape):
                raise NotStreamable(f"{files.name} stores {key}, which {base.folder.name} does not hold in that shape")
            plan.replaced[key] = tensor
        for module, parts in groups.items():
            embedding = "lora_embedding_A" in parts
            a, b = (parts.get("lora_embedding_A"), parts.get("lora_embedding_B")) if embedding \
                else (parts.get("lora_A"), parts.get("lora_B"))
            if a is None or b is None:
                raise Incompatible(f"{files.name}: {module} has only half of its LoRA factors (A or B is missing)")
            key = f"{module}.weight"
            if key not in base:
                raise NotStreamable(f"{files.name} targets {module}, which is not a tensor name in {base.folder.name}")
            if tied and module.rsplit(".", 1)[-1] in ("lm_head", "embed_tokens", "wte"):
                raise NotStreamable(f"{files.name} changes a tied embedding ({module})")
            transposed = embedding or bool(files.config.get("fan_in_fan_out"))
            shape = (a.shape[1], b.shape[0]) if transposed else (b.shape[0], a.shape[1])
            if tuple(base.shape(key)) != shape:
                raise Incompatible(f"{files.name}: {module} changes a {shape[0]}x{shape[1]} weight, but "
                                   f"{base.folder.name} has {'x'.join(map(str, base.shape(key)))} there: the adapter "
                                   "was trained for another base")
            factor = peft_scale(files.config, module, a.shape[0], weight)
            plan.changes.setdefault(key, []).append(Change(a, b, factor, transposed))
    return plan


def _shards(base: ModelTensors) -> list[list[str]]:
    """The base's keys in its own order, cut into shards of about SHARD_BYTES."""
    shards, size = [[]], 0
    for key in base.keys():
        nbytes = base.nbytes(key)
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    return shards


def memory_need(path: Path) -> int:
    """Memory of this merge: a float32 copy of the largest tensor and its delta, and one output shard twice
    (safetensors' save_file copies it to bytes)."""
    sizes = machine.tensor_sizes(path)
    largest = max((n for _, n in sizes.values()), default=0)
    return int(3 * 4 * largest + 2 * min(SHARD_BYTES, machine.weights_size(path)) + machine.PROCESS_FLOOR)


def copy_side_files(src: Path, dst: Path) -> None:
    """Config, tokenizer, generation config, chat template: every top-level file but the weights."""
    for f in Path(src).iterdir():
        if f.is_file() and f.suffix not in _WEIGHT_SUFFIXES and f.name not in _NOT_COPIED:
            shutil.copy2(f, dst / f.name)


def write_merged(src: Path, plan: MergePlan, out: Path, progress: Progress = no_progress) -> None:
    """Write `src` with `plan` merged into the (empty, staging) folder `out`, shard by shard."""
    from safetensors.torch import save_file

    base = ModelTensors(src)
    shards = _shards(base)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))] \
        if len(shards) > 1 else ["model.safetensors"]
    weight_map, total = {}, 0
    for name, keys in zip(names, shards):
        tensors = {}
        for key in keys:
            t = plan.merged(key, base.get(key))
            tensors[key] = t.contiguous()
            total += t.numel() * t.element_size()
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, name))
        progress(None, f"wrote {name}")
        del tensors
    if len(shards) > 1:
        (out / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    copy_side_files(src, out)
