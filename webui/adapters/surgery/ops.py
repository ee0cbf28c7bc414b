"""Adapter surgery: `resize`, `convert --to lora` and `extract`, each writing a plain PEFT LoRA into the loras dir
with the error it made (svd.py does the SVD, folders.py the files).

- resize: each layer's scaled s·B·A (s = alpha/r, alpha/√r with rsLoRA, per alpha_pattern) re-factored to a
  rank or an energy share; a rank ≥ the source's reproduces it to float rounding.
- convert: a DoRA layer's output is (m/‖W + sBA‖_row)·(W + sBA)·x (PEFT's DoraLinearLayer, dropout aside), so
  its weight change ΔW = diag(m/‖W + sBA‖)(W + sBA) − W needs the base W: read per layer from its safetensors.
  That ΔW is full-rank in general (the magnitude rescales W itself), so a plain LoRA of the source's rank is an
  approximation whose error is printed; `--rank` up to min(out, in) makes it exact.
- extract: ΔW = T − B per targetable layer of two models read one tensor at a time; tensors that changed
  outside those layers (embeddings, norms, lm_head) are named, since the LoRA cannot carry them.

Each takes `progress(fraction, message)` and a `cancel` threading.Event (checked between layers: a cancelled
operation returns None and leaves nothing behind).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from webui.adapters.files import load_weights, locate_adapter, read_adapter
from webui.adapters.gguf_lora import peft_scale
from webui.adapters.surgery.folders import ModelTensors, find_model, lora_config, peft_key, write_lora
from webui.adapters.surgery.svd import Fit, factor_dense, factor_lowrank, totals
from webui.adapters.types import split_key
from webui.errors import BadInput
from webui.progress import Progress, no_progress

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass
class Result:
    """What an operation wrote and how close it came: per-layer fits and the totals (surgery.totals)."""

    path: Path
    operation: str
    fits: list[Fit]
    total: dict
    notes: list[str] = field(default_factory=list)


def _goal(rank: int | None, energy: float | None) -> str:
    if (rank is None) == (energy is None):
        raise BadInput("give one of --rank R or --energy E")
    if rank is not None and rank < 1:
        raise BadInput(f"--rank {rank}: must be at least 1")
    if energy is not None and not 0 < energy <= 1:
        raise BadInput(f"--energy {energy}: must be in (0, 1], the share of each layer's ‖ΔW‖² to keep")
    return f"--rank {rank}" if rank is not None else f"--energy {energy:g}"


def _modules(state: dict, name: str) -> tuple[dict[str, dict], dict]:
    """{module: {part: tensor}} for the LoRA layers, and the other tensors (modules_to_save), unchanged."""
    groups, kept = {}, {}
    for key, tensor in state.items():
        module, part = split_key(key)
        if part in ("lora_embedding_A", "lora_embedding_B"):
            raise BadInput(f"{name}: has a LoRA on an embedding layer ({module}); surgery handles linear layers only")
        if key.endswith(".bias") and part == "lora_B":
            raise BadInput(f"{name}: has LoRA biases (lora_bias=True, {module}); a bias cannot be re-factored "
                           "as a LoRA")
        if not part:
            kept[key] = tensor
            continue
        groups.setdefault(module, {})[part] = tensor
    return groups, kept


def _dtype(t: torch.Tensor) -> torch.dtype:
    return t.dtype if t.dtype in _DTYPES else torch.float32


def _stopped(cancel: threading.Event | None) -> bool:
    return cancel is not None and cancel.is_set()


def _finish(loras_dir, out, source_cfg, fits, factors, kept, base, record, section, force, fan_in_fan_out=False,
            notes=()):
    ranks = {f.module: f.rank for f in fits}
    cfg = lora_config(source_cfg, [m.rsplit(".", 1)[-1] for m in ranks], ranks, base, fan_in_fan_out)
    tensors = dict(kept)
    for module, (b, a) in factors.items():
        tensors[peft_key(module, "lora_A")], tensors[peft_key(module, "lora_B")] = a, b
    total = totals(fits)
    record = {**record, "total": total, "layers": [f.to_dict() for f in fits], "notes": list(notes)}
    path = write_lora(loras_dir, out, cfg, tensors, record, section + _card_table(fits, total, notes), force)
    return Result(path, record["operation"], fits, total, list(notes))


def _card_table(fits: list[Fit], total: dict, notes) -> list[str]:
    lines = ["", (f"Relative error of the whole adapter ‖ΔW − B·A‖/‖ΔW‖: **{total['rel_error']:.3e}** "
             f"(energy kept {total['energy']:.6f}; largest layer error {total['max_layer_error']:.3e})."), ""]
    lines += [f"- {n}" for n in notes] + ([""] if notes else [])
    lines += ["| layer | rank | source rank | energy kept | relative error |", "|---|---|---|---|---|"]
    lines += [f"| {f.module} | {f.rank} | {f.source_rank} | {f.energy:.6f} | {f.rel_error:.3e} |" for f in fits]
    return lines


def _adapter(name: str, loras_dir: Path):
    path = locate_adapter(name, Path(loras_dir), anywhere=True)
    files = read_adapter(path, path.name)
    if files.format not in ("safetensors", "bin"):
        raise BadInput(f"{files.name}: a {files.format} adapter; surgery reads PEFT folders")
    if files.config.get("target_parameters"):  # MoE expert parameters: their LoRA layout is not a linear layer's
        raise BadInput(f"{files.name}: targets parameters (target_parameters); surgery handles linear layers only")
    return files, load_weights(files)


def resize(name: str, loras_dir: Path, out: str, rank: int | None = None, energy: float | None = None,
           force: bool = False, progress: Progress = no_progress, cancel: threading.Event | None = None
           ) -> Result | None:
    goal = _goal(rank, energy)
    files, state = _adapter(name, loras_dir)
    cfg = files.config
    if cfg.get("use_dora") or any(split_key(k)[1] == "lora_magnitude_vector" for k in state):
        raise BadInput(f"{files.name}: a DoRA adapter: its change depends on the base's weights; convert it "
                       f"first: python -m webui convert {files.name} --to lora --out {out}")
    groups, kept = _modules(state, files.name)
    fits, factors = [], {}
    for i, (module, parts) in enumerate(sorted(groups.items())):
        if _stopped(cancel):
            return None
        a, b = parts["lora_A"], parts["lora_B"]
        scale = peft_scale(cfg, module, a.shape[0])
        b2, a2, fit = factor_lowrank(b, a, scale, rank, energy, module, _dtype(a))
        fits.append(fit)
        factors[module] = (b2, a2)
        progress((i + 1) / len(groups), f"{module}: rank {fit.source_rank} → {fit.rank}, energy {fit.energy:.4f}")
    if not fits:
        raise BadInput(f"{files.name}: holds no LoRA layers to resize")
    section = ["## How this adapter was made", "",
               (f"Made with LoRA Deck: `python -m webui resize {files.name} {goal} --out {out}`. Each layer's scaled "
               "update s·B·A of the source was re-factored by a truncated SVD (scale 1 in this adapter).")]
    record = {"operation": "resize", "source": files.name, "goal": goal}
    return _finish(loras_dir, out, cfg, fits, factors, kept, cfg.get("base_model_name_or_path") or "", record,
                   section, force, bool(cfg.get("fan_in_fan_out")))


def convert(name: str, loras_dir: Path, out: str, models_dir: Path, model: str | None = None,
            rank: int | None = None, energy: float | None = None, force: bool = False,
            progress: Progress = no_progress, cancel: threading.Event | None = None) -> Result | None:
    goal = _goal(rank, energy) if (rank is not None or energy is not None) else ""
    files, state = _adapter(name, loras_dir)
    cfg = files.config
    groups, kept = _modules(state, files.name)
    if not any("lora_magnitude_vector" in parts for parts in groups.values()):
        raise BadInput(f"{files.name}: already a plain LoRA (no DoRA magnitudes): nothing to convert. To change "
                       f"its rank: python -m webui resize {files.name} --rank R --out {out}")
    named = str(cfg.get("base_model_name_or_path") or "")
    if not model and not named:
        raise BadInput(f"{files.name}: names no base model; give it with --model (DoRA needs the base's weights)")
    base_path = find_model(model or named, models_dir, "base model")
    base = ModelTensors(base_path)
    fan = bool(cfg.get("fan_in_fan_out"))
    fits, factors = [], {}
    for i, (module, parts) in enumerate(sorted(groups.items())):
        if _stopped(cancel):
            return None
        a, b = parts["lora_A"], parts["lora_B"]
        scale = peft_scale(cfg, module, a.shape[0])
        if "lora_magnitude_vector" not in parts:  # a plain layer in the same adapter: exact at its own rank
            b2, a2, fit = factor_lowrank(b, a, scale, rank or (None if energy else a.shape[0]), energy, module,
                                         _dtype(a))
        else:
            w = base.get(f"{module}.weight").double()
            w = w.T if fan else w  # GPT-2's Conv1D keeps (in, out): PEFT transposes it the same way
            if w.shape != (b.shape[0], a.shape[1]):
                raise BadInput(f"{files.name}: {module} is {a.shape[1]}→{b.shape[0]}, but {base_path.name}'s "
                               f"weight is {tuple(w.shape)}: not the base it was trained on (--model)")
            v = w + scale * (b.double() @ a.double())
            m = parts["lora_magnitude_vector"].double().reshape(-1)
            delta = (m / torch.linalg.norm(v, dim=1))[:, None] * v - w
            b2, a2, fit = factor_dense(delta, rank or (None if energy else a.shape[0]), energy, module, _dtype(a),
                                       source_rank=a.shape[0])
        fits.append(fit)
        factors[module] = (b2, a2)
        progress((i + 1) / len(groups), f"{module}: rank {fit.rank}, error {fit.rel_error:.3e}")
    command_goal = f"{goal} " if goal else ""  # the default rank: the source's, per layer
    section = ["## How this adapter was made", "",
               (f"Made with LoRA Deck: `python -m webui convert {files.name} --to lora {command_goal}--out {out}`. The "
               f"DoRA source's weight change diag(m/‖W + sBA‖)(W + sBA) − W on `{base_path.name}` was computed per "
               "layer and factored by a truncated SVD into a plain LoRA (scale 1).")]
    record = {"operation": "convert", "source": files.name, "base": named or str(base_path),
              "goal": goal or "source rank"}
    return _finish(loras_dir, out, cfg, fits, factors, kept, named or str(base_path), record, section, force, fan)


def extract(base: str, tuned: str, models_dir: Path, loras_dir: Path, out: str, rank: int | None = None,
            energy: float | None = None, force: bool = False, progress: Progress = no_progress,
            cancel: threading.Event | None = None) -> Result | None:
    goal = _goal(rank, energy)
    base_path, tuned_path = find_model(base, models_dir, "base model"), find_model(tuned, models_dir, "tuned model")
    b_tensors, t_tensors = ModelTensors(base_path), ModelTensors(tuned_path)
    layers, fan = _linear_layers(t_tensors, tuned_path)
    fits, factors, done = [], {}, set()
    for i, (module, kind) in enumerate(layers):
        if _stopped(cancel):
            return None
        key = f"{module}.weight"
        if key not in b_tensors or b_tensors.shape(key) != t_tensors.shape(key):
            raise BadInput(f"{base_path.name} and {tuned_path.name} differ in shape at {key}: a tuned model must "
                           "keep its base's architecture")
        t = t_tensors.get(key)
        delta = t.double().sub_(b_tensors.get(key))  # in place: one float64 copy of the layer, not three
        done.add(key)
        if kind == "conv1d":
            delta = delta.T
        if not bool(delta.any()):
            progress((i + 1) / len(layers), f"{module}: unchanged")
            continue
        b2, a2, fit = factor_dense(delta, rank, energy, module, _dtype(t))
        fits.append(fit)
        factors[module] = (b2, a2)
        progress((i + 1) / len(layers), f"{module}: rank {fit.rank}, error {fit.rel_error:.3e}")
        del t, delta
    if not fits:
        raise BadInput(f"{tuned_path.name} equals {base_path.name} in every layer a LoRA can target: nothing to "
                       "extract")
    notes = _untouched_changes(b_tensors, t_tensors, done, cancel)
    if notes is None:
        return None
    named = base if (Path(models_dir) / base).is_dir() else str(base_path.resolve())
    section = ["## How this adapter was made", "",
               (f"Extracted with LoRA Deck: `python -m webui extract --base {base} --tuned {tuned} {goal} "
                f"--out {out}`: "
               f"the difference of `{tuned_path.name}` and `{base_path.name}` in each targetable linear layer, "
               "factored by a truncated SVD (scale 1).")]
    record = {"operation": "extract", "base": named, "tuned": tuned, "goal": goal}
    return _finish(loras_dir, out, None, fits, factors, {}, named, record, section, force, fan, notes)


def _linear_layers(tensors: ModelTensors, path: Path) -> tuple[list[tuple[str, str]], bool]:
    """(module, kind) of the layers to extract: the architecture's documented LoRA targets (LoRAX's table in
    webui/adapters/targets.py) or, for an architecture not in it, every linear layer; never lm_head (it is tied
    or vocabulary-sized, and vLLM / llama.cpp refuse a LoRA there). Found by building the model from its config
    on the meta device (no weights), which tells Linear from GPT-2's transposed Conv1D."""
    from transformers import AutoConfig

    from webui.adapters.targets import describe_config

    try:
        desc = describe_config(AutoConfig.from_pretrained(str(path), local_files_only=True), path.name)
    except Exception as e:
        raise BadInput(f"{path.name}: cannot read its config.json ({e})") from None
    wanted = set(desc.documented) - {"lm_head"}
    layers = [(m, layer.kind) for m, layer in sorted(desc.layers.items())
              if layer.kind in ("linear", "conv1d") and m.rsplit(".", 1)[-1] != "lm_head"
              and (not wanted or m.rsplit(".", 1)[-1] in wanted) and f"{m}.weight" in tensors]
    if not layers:
        raise BadInput(f"{path.name}: found no linear layers to extract from")
    return layers, any(kind == "conv1d" for _, kind in layers)


def _untouched_changes(base: ModelTensors, tuned: ModelTensors, done: set, cancel) -> list[str] | None:
    """Notes naming the tensors that changed outside the extracted layers (compared one at a time)."""
    changed, missing = [], []
    for key in tuned.keys():  # noqa: SIM118 (a ModelTensors, not a dict)
        if _stopped(cancel):
            return None
        if key in done:
            continue
        if key not in base:
            missing.append(key)
        elif base.shape(key) != tuned.shape(key) or not torch.equal(base.get(key), tuned.get(key)):
            changed.append(key)
    notes = []
    if changed:
        notes.append(f"{len(changed)} tensor(s) changed outside the extracted layers and are NOT in this LoRA: "
                     + ", ".join(changed[:8]) + (" ..." if len(changed) > 8 else ""))
    if missing:
        notes.append(f"{len(missing)} tensor(s) of the tuned model are not in the base: " + ", ".join(missing[:8]))
    return notes
