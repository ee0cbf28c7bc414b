"""LoRA adapters on a transformers-family model (float or GPTQ) through PEFT: add adapters to a cache,
activate any weighted set of them (a stack: several active at once, each with its own scale — ranks
may differ), switch sets without reloading the base, disable them all (the base computes exactly as
before), merge the active set into the base weights and unmerge it, and blend several into a new
adapter with PEFT's `add_weighted_adapter`, corrected and checked by webui/adapters/exact_blend.py (its
scale is right for rsLoRA sources, DoRA / LoRA-bias sources are refused, a `cat` blend equals the stack).

PEFT injects LoRA layers into the base model in place, so the model object the backend generates with
is unchanged; a stack is PEFT's multi-adapter activation with `LoraLayer.set_scale` per adapter, which
computes sum_i w_i * (alpha_i/r_i) * B_i A_i x — the same function as PEFT's `cat` combination.
"""
from __future__ import annotations

import json
import logging
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from peft import PeftConfig, get_peft_model, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer

from webui.adapters.exact_blend import EXACT, RECORD, deviation, fix_scale, refuse_unblendable, tolerance
from webui.adapters.types import COMBINATIONS
from webui.errors import BadInput, first_line

log = logging.getLogger(__name__)



def peft_key(name: str) -> str:
    """The name PEFT knows an adapter by. PEFT keeps adapters in torch ModuleDicts, whose keys cannot hold '.',
    and adapter folders often do ("llama-3.1-style", "v0.2"): the dots are spelled out."""
    return name.replace(".", "_dot_")


class PeftAdapterStack:
    def __init__(self, model):
        self.base = model        # the transformers model; PEFT modifies it in place
        self.peft = None         # the PeftModel wrapping it, once an adapter was added
        self.loaded: dict[str, tuple] = {}   # name -> file signature (to notice changed files)
        self.active: dict[str, float] = {}
        self.merged = False
        self._enabled = True  # PEFT's adapter layers start enabled

    # -- cache ---------------------------------------------------------------------------------------
    def add(self, name: str, config: dict, state: dict, ignored: list[str] = (), signature: tuple = ()) -> None:
        """Add an adapter (not activated). `ignored` target names are dropped from config and weights."""
        if name in self.loaded:
            self.delete(name)
        cfg = {k: v for k, v in config.items() if k not in ("auto_mapping",)}
        cfg.setdefault("peft_type", "LORA")
        cfg["inference_mode"] = True
        targets = cfg.get("target_modules")
        if isinstance(targets, list) and ignored:
            cfg["target_modules"] = [t for t in targets if t not in ignored]
        state = {k: v for k, v in state.items() if not any(f".{leaf}." in k for leaf in ignored)}
        try:
            lora_config = PeftConfig.from_peft_type(**cfg)
        except (TypeError, ValueError) as e:
            raise BadInput(f"{name}: adapter_config.json is not a valid LoRA config ({e})") from None
        was_merged = self.merged
        if was_merged:
            self.unmerge()
        try:
            if self.peft is None:
                self.peft = get_peft_model(self.base, lora_config, adapter_name=peft_key(name))
                self._enabled = True
            else:
                self.peft.add_adapter(peft_key(name), lora_config)
            self.peft.eval()  # get_peft_model leaves the model in training mode (dropout on, no mixed batches)
            result = set_peft_model_state_dict(self.peft, state, adapter_name=peft_key(name))
            unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
            if unexpected:
                raise BadInput(f"{name}: {len(unexpected)} weight(s) match no layer of the base, e.g. {unexpected[0]}")
        except Exception as e:
            self._drop(name)
            self._apply(self.active)
            if isinstance(e, BadInput):
                raise
            raise BadInput(f"{name}: PEFT could not load it: {first_line(e)}") from e
        self.loaded[name] = signature
        self._apply(self.active)
        if was_merged:
            self.merge()

    def _drop(self, name: str) -> None:
        if self.peft is not None and peft_key(name) in self.peft.peft_config:
            if len(self.peft.peft_config) == 1:
                # PEFT cannot delete the last adapter; unwrap to the plain base instead.
                self.base = self.peft.unload()
                self.peft = None
            else:
                self.peft.delete_adapter(peft_key(name))
        self.loaded.pop(name, None)

    def delete(self, name: str) -> None:
        if self.merged:
            self.unmerge()
        self.active.pop(name, None)
        self._drop(name)
        self._apply(self.active)

    # -- activation ----------------------------------------------------------------------------------
    def set_active(self, weights: dict[str, float]) -> None:
        missing = [n for n in weights if n not in self.loaded]
        if missing:
            raise BadInput(f"adapter(s) not loaded: {', '.join(missing)}")
        if self.merged:
            self.unmerge()
        self._apply(dict(weights))

    def _apply(self, weights: dict[str, float]) -> None:
        self.active = dict(weights)
        if self.peft is None:
            return
        tuner = self.peft.base_model
        if not weights:
            tuner.disable_adapter_layers()
            self._enabled = False
            return
        if not self._enabled:  # each toggle walks every module; skip it when nothing changes
            tuner.enable_adapter_layers()
            self._enabled = True
        tuner.set_adapter([peft_key(n) for n in weights], inference_mode=True)
        for module in self.peft.modules():
            if isinstance(module, LoraLayer):
                for name, w in weights.items():
                    module.set_scale(peft_key(name), float(w))

    @contextmanager
    def mixed(self, names: list[str]):
        """Prepare a PEFT mixed batch where row i uses adapter names[i] ("__base__" = none), each at
        weight 1; yields the names as PEFT knows them (generate's `adapter_names`). The active stack (and a
        merge) is restored afterwards."""
        needed = {n for n in names if n != "__base__"}
        missing = needed - set(self.loaded)
        if missing:
            raise BadInput(f"adapter(s) not loaded: {', '.join(sorted(missing))}")
        was_merged, previous = self.merged, dict(self.active)
        self.unmerge()  # a mixed batch needs the adapters as separate layers
        if not self._enabled:
            self.peft.base_model.enable_adapter_layers()
            self._enabled = True
        for module in self.peft.modules():
            if isinstance(module, LoraLayer):
                for name in needed:
                    module.set_scale(peft_key(name), 1.0)
        try:
            yield [n if n == "__base__" else peft_key(n) for n in names]
        finally:
            self._apply(previous)
            if was_merged:
                self.merge()

    # -- merge ---------------------------------------------------------------------------------------
    def merge(self) -> None:
        if not self.active:
            raise BadInput("no adapter is active: nothing to merge")
        if self.merged:
            return
        try:
            self.peft.base_model.merge_adapter(safe_merge=True)  # checks for NaN/Inf before keeping
        except ValueError as e:
            raise BadInput(f"merge refused: {e}") from None
        self.merged = True

    def unmerge(self) -> None:
        if self.merged:
            self.peft.base_model.unmerge_adapter()
            self.merged = False

    # -- blend ---------------------------------------------------------------------------------------
    def blend(self, weights: dict[str, float], new_name: str, combination_type: str, out_dir: Path,
              density: float | None = None, svd_rank: int | None = None,
              majority_sign_method: str | None = None) -> Path:
        """Combine loaded adapters into `new_name` and save it as a PEFT adapter folder at out_dir/new_name."""
        if combination_type not in COMBINATIONS:
            raise BadInput(f"combination_type {combination_type!r} is not one of: {', '.join(COMBINATIONS)}")
        missing = [n for n in weights if n not in self.loaded]
        if missing or not weights:
            raise BadInput(f"adapter(s) to blend must be loaded first: {', '.join(missing) or '(none given)'}")
        target = Path(out_dir) / new_name
        if target.exists():
            raise BadInput(f"{target} already exists; pick another name")
        if self.merged:
            self.unmerge()
        refuse_unblendable({n: self.peft.peft_config[peft_key(n)] for n in weights})
        previous = dict(self.active)
        self._apply({n: 1.0 for n in weights})  # add_weighted_adapter reads each layer's current scaling
        kwargs = {}
        if combination_type in ("ties", "ties_svd", "dare_linear", "dare_ties", "magnitude_prune"):
            kwargs["density"] = density if density is not None else 0.5
        if combination_type.endswith("svd") and svd_rank:
            kwargs["svd_rank"] = svd_rank
        if combination_type in ("ties", "ties_svd", "dare_ties") and majority_sign_method:
            kwargs["majority_sign_method"] = majority_sign_method
        key = peft_key(new_name)
        try:
            self.peft.add_weighted_adapter([peft_key(n) for n in weights], [float(w) for w in weights.values()],
                                           key, combination_type=combination_type, **kwargs)
        except (ValueError, TypeError, KeyError, RuntimeError) as e:  # KeyError: a name PEFT cannot use
            self._apply(previous)
            raise BadInput(f"blend failed: {first_line(e)}") from None
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        try:
            fix_scale(self.peft, key)
            off, where = deviation(self.peft, {peft_key(n): w for n, w in weights.items()}, key)
            dtype = next((p.dtype for n, p in self.peft.named_parameters() if n.endswith(f".{key}.weight")),
                         torch.float32)
            exact = off <= tolerance(dtype)
            if combination_type in EXACT and not exact:
                raise BadInput(f"blend refused: the {combination_type} blend would differ from the weighted stack "
                               f"by {off:.2%} in {where} (the sources' configs cannot be expressed as one adapter, "
                               "e.g. different layers_to_transform); use the stack itself")
            note = "equals the weighted stack" if exact else (
                f"an approximation ({combination_type}): its weight change differs from the weighted stack's by up "
                f"to {off:.1%} (in {where}); 'cat' is the exact combination")
            if not exact:
                log.warning("blend %s is %s", new_name, note)
            with tempfile.TemporaryDirectory(dir=out_dir, prefix=".blend-", ignore_cleanup_errors=True) as tmp:
                self.peft.save_pretrained(tmp, selected_adapters=[key])
                saved = Path(tmp) / key
                saved = saved if saved.is_dir() else Path(tmp)
                (saved / RECORD).write_text(json.dumps(
                    {"sources": dict(weights), "combination": combination_type, "density": kwargs.get("density"),
                     "exact": exact, "max_relative_deviation": off, "note": note}, indent=2))
                shutil.move(str(saved), str(target))
        finally:
            self.peft.delete_adapter(key)
            self._apply(previous)
        return target
