"""LoRA adapters on a transformers-family model (float or GPTQ) through PEFT: add adapters to a cache,
activate any weighted set of them (a stack: several active at once, each with its own scale — ranks
may differ), switch sets without reloading the base, disable them all (the base computes exactly as
before), merge the active set into the base weights and unmerge it, and blend several into a new
adapter with PEFT's `add_weighted_adapter`, corrected and checked by webui/adapters/exact_blend.py (its
scale is right for rsLoRA sources, DoRA / LoRA-bias sources are refused, a `cat` blend equals the stack).

PEFT injects LoRA layers into the base model in place, so the model object the backend generates with
is unchanged; a stack is PEFT's multi-adapter activation with `LoraLayer.set_scale` per adapter, which
computes sum_i w_i * (alpha_i/r_i) * B_i A_i x — the same function as PEFT's `cat` combination.

Switching is a hot path (every request that names another adapter). PEFT's `set_adapter`,
`enable/disable_adapter_layers` walk every module of the model and reset `requires_grad` on every adapter
weight each time; here the LoRA layers are collected once per change of the PEFT model's structure (add,
delete, blend), PEFT's own calls bring them to a known state once (inference mode: every adapter weight
frozen), and after that a switch sets only what changed on those layers — the active names, the enabled
flag, the scale of an adapter whose weight changed — which is what PEFT's calls leave behind.

Decoding with an unmerged adapter runs PEFT's LoRA forward in every targeted layer for every token; on CPU
its cost is mostly per-call dispatch (the lora_A, lora_B and dropout module calls, a multiply by a scale
of 1), not arithmetic. The float and GPTQ LoRA layers get a forward (`_QuickForward`) that computes the
same operations in the same order — so the same numbers — as plain functions, in eval mode for vanilla
LoRA under no_grad / inference_mode (as generation runs), also for PEFT's mixed batches (`adapter_names`, the
continuous batch's rows) on float layers; anything else (autograd on, training, DoRA and other variants, disabled
or merged layers, a dtype cast such as a bf16 base with float32 adapter
weights, hooks) goes to PEFT's own forward.
"""
from __future__ import annotations

import json
import logging
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import PeftConfig, get_peft_model, set_peft_model_state_dict
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora import LoraLayer
from peft.tuners.lora.gptq import GPTQLoraLinear
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.other import AuxiliaryTrainingWrapper
from torch import nn
from torch.nn.modules import module as torch_module

from webui.adapters.exact_blend import EXACT, RECORD, deviation, fix_scale, refuse_unblendable, tolerance
from webui.adapters.types import COMBINATIONS
from webui.errors import BadInput, first_line

log = logging.getLogger(__name__)



def peft_key(name: str) -> str:
    """The name PEFT knows an adapter by. PEFT keeps adapters in torch ModuleDicts, whose keys cannot hold '.',
    and adapter folders often do ("llama-3.1-style", "v0.2"): the dots are spelled out."""
    return name.replace(".", "_dot_")


class _QuickForward:
    """PEFT's vanilla-LoRA inference forward (see the module docstring): base(x), then for each active
    adapter `result + lora_B(lora_A(dropout(x))) * scaling` as F.linear calls, the multiply skipped where
    the scale is 1 (x * 1.0 == x exactly). Mixed into PEFT's own layer classes (the instances' class is
    switched when the stack collects its layers), so everything else about the layers is PEFT's."""

    _mixes = False  # whether the layer class has PEFT's mixed batch (`adapter_names`), done here as PEFT does it

    def forward(self, x, *args, **kwargs):
        if (args or self.training or self._disable_adapters or self.merged_adapters
                or torch.is_grad_enabled()):  # with autograd on, PEFT's modules (and any backward hooks) run
            return super().forward(x, *args, **kwargs)
        if kwargs:
            names = kwargs.get("adapter_names")
            if self._mixes and len(kwargs) == 1 and names is not None:
                return self._mixed(x, names)
            return super().forward(x, *args, **kwargs)
        # the ModuleDicts' own dicts: PEFT's `self.lora_A[key]` is the same lookup, through two Python calls
        mods = self._modules
        lora_A, lora_B, dropouts = mods["lora_A"]._modules, mods["lora_B"]._modules, mods["lora_dropout"]._modules
        active = self._active_adapter
        plan = []
        for key in active if isinstance(active, list) else (active,):
            a = lora_A.get(key)
            if a is None:
                continue  # PEFT skips an active adapter this layer does not hold
            b, dropout = lora_B[key], dropouts[key]
            wa = _plain(a)
            wb = _plain(b)
            if (wa is None or wb is None or key in self.lora_variant or x.dtype != wa[0].dtype
                    or not _identity(dropout)):
                return super().forward(x, *args, **kwargs)
            plan.append((wa, wb, self.scaling[key]))
        if torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks:
            return super().forward(x, *args, **kwargs)
        result = self._base(x)
        dtype = result.dtype
        for (wa, ba), (wb, bb), scaling in plan:
            lora = F.linear(F.linear(x, wa, ba), wb, bb)
            result = result + lora if scaling == 1 else result + lora * scaling
            if self._cast_each and result.dtype != dtype:
                result = result.to(dtype)
        return result if result.dtype == dtype else result.to(dtype)


    def _mixed(self, x, names):
        """PEFT's _mixed_batch_forward for vanilla LoRA: base(x), then each adapter's rows get
        `lora_B(lora_A(x[rows])) * scaling` added. The same operations on the same rows; the rows of each adapter
        are found once per batch (not in every layer, as PEFT does), and a batch of one adapter is not gathered."""
        mods = self._modules
        lora_A, lora_B, dropouts = mods["lora_A"]._modules, mods["lora_B"]._modules, mods["lora_dropout"]._modules
        plan = []
        for key, rows in _row_groups(names, x.device):
            a = lora_A.get(key)
            if key == "__base__" or a is None:
                continue
            wa, wb = _plain(a), _plain(lora_B[key])
            if (wa is None or wb is None or key in self.lora_variant or x.dtype != wa[0].dtype
                    or not _identity(dropouts[key])):
                return super().forward(x, adapter_names=names)
            plan.append((rows, wa, wb, self.scaling[key]))
        if torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks:
            return super().forward(x, adapter_names=names)
        result = self._base(x)
        dtype = result.dtype
        for rows, (wa, ba), (wb, bb), scaling in plan:
            lora = F.linear(F.linear(x if rows is None else x.index_select(0, rows), wa, ba), wb, bb)
            lora = lora if scaling == 1 else lora * scaling
            lora = lora if lora.dtype == dtype else lora.to(dtype)
            if rows is None:
                result += lora
            else:
                result.index_add_(0, rows, lora)
        return result


_GROUPS: dict = {}  # (adapter names of a batch's rows, device) -> [(name, row indices or None for all rows)]


def _row_groups(names, device) -> list:
    key = (tuple(names), device)
    groups = _GROUPS.get(key)
    if groups is None:
        order = list(dict.fromkeys(names))
        groups = [(n, None if len(order) == 1 else
                   torch.tensor([i for i, m in enumerate(names) if m == n], device=device)) for n in order]
        if len(_GROUPS) >= 512:  # batches come and go: keep the cache small
            _GROUPS.clear()
        _GROUPS[key] = groups
    return groups


def _plain(linear):
    """(weight, bias) of an nn.Linear whose call is exactly F.linear(x, weight, bias) (no hooks, no replaced
    forward), else None."""
    if type(linear) is not nn.Linear or linear._forward_hooks or linear._forward_pre_hooks or "forward" in linear.__dict__:
        return None
    params = linear._parameters
    return params["weight"], params["bias"]


def _identity(dropout) -> bool:
    """Whether calling this dropout module returns its input as it is: nn.Identity, or nn.Dropout in eval mode."""
    return ((type(dropout) is nn.Identity or type(dropout) is nn.Dropout and not dropout.training)
            and not dropout._forward_hooks and not dropout._forward_pre_hooks and "forward" not in dropout.__dict__)


class _QuickLoraLinear(_QuickForward, LoraLinear):
    _cast_each = False  # PEFT's Linear casts back to the base output's dtype once, after all adapters
    _mixes = True

    def _base(self, x):
        return self.base_layer(x)


class _QuickGPTQLoraLinear(_QuickForward, GPTQLoraLinear):
    _cast_each = True  # PEFT's GPTQ layer casts back after each adapter

    def _base(self, x):
        return self.quant_linear_module(x)


_QuickLoraLinear.__name__, _QuickGPTQLoraLinear.__name__ = "Linear", "GPTQLoraLinear"  # as printed by PEFT
_QUICK = {LoraLinear: _QuickLoraLinear, GPTQLoraLinear: _QuickGPTQLoraLinear}


def _warn_bias(tuner) -> None:
    """The warning PEFT's disable_adapter_layers gives (a LoRA bias stays in the output when disabled)."""
    for key in tuner.active_adapters:
        bias_val = getattr(tuner.peft_config[key], "bias", "none")
        if bias_val != "none":
            warnings.warn(f"Careful, disabling adapter layers with bias configured to be '{bias_val}' does not "
                          "produce the same output as the base model would without adaption.")


class PeftAdapterStack:
    def __init__(self, model):
        self.base = model        # the transformers model; PEFT modifies it in place
        self.peft = None         # the PeftModel wrapping it, once an adapter was added
        self.loaded: dict[str, tuple] = {}   # name -> file signature (to notice changed files)
        self.active: dict[str, float] = {}
        self.merged = False
        self._enabled = True  # PEFT's adapter layers start enabled
        self._layers: list | None = None  # PEFT's tuner layers, collected once per structure (_lora_layers)
        self._simple = False   # every tuner layer a LoRA layer, no modules_to_save: the quick switch applies
        self._synced = False   # the layers hold a state PEFT's own calls set (every adapter weight frozen)
        self._scales: dict[str, float] = {}  # the weight each adapter's scaling was last set for

    # -- cache ---------------------------------------------------------------------------------------
    def add(self, name: str, config: dict, state: dict, ignored: list[str] = (), signature: tuple = ()) -> None:
        """Add an adapter (not activated). `ignored` target names are dropped from config and weights. New weights
        for an adapter of the active stack (its files changed: a live checkpoint's newer save) keep its place."""
        keep = self.active.get(name)
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
            self._restructured()
            self._apply(self.active)
            if isinstance(e, BadInput):
                raise
            raise BadInput(f"{name}: PEFT could not load it: {first_line(e)}") from e
        self.loaded[name] = signature
        self._restructured()
        if keep is not None:
            self.active[name] = keep
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
            self._restructured()
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

    def _restructured(self) -> None:
        """PEFT added or removed adapter layers (or may have unfrozen some): collect them again, and let
        PEFT's own calls set the next state in full."""
        self._layers, self._simple, self._synced = None, False, False
        self._scales = {}

    def _lora_layers(self) -> list | None:
        """The model's LoRA layers when the quick switch applies, else None: right after a change of
        structure (PEFT's calls set that state in full), with modules_to_save / trainable-token wrappers or
        other tuner layers (PEFT's calls handle those, as before), or while any layer is merged."""
        if self._layers is None:
            tuner = self.peft.base_model
            layer_cls = getattr(tuner, "tuner_layer_cls", LoraLayer)
            layers, simple = [], True
            for module in self.peft.modules():
                if isinstance(module, BaseTunerLayer):
                    if type(module) in _QUICK:
                        module.__class__ = _QUICK[type(module)]
                    layers.append(module)
                    simple = simple and isinstance(module, layer_cls)
                elif isinstance(module, AuxiliaryTrainingWrapper):
                    simple = False
            self._layers, self._simple = layers, simple
        if not (self._synced and self._simple) or any(m.merged for m in self._layers):
            return None
        return self._layers

    def _apply(self, weights: dict[str, float]) -> None:
        self.active = dict(weights)
        if self.peft is None:
            return
        tuner = self.peft.base_model
        keys = [peft_key(n) for n in weights]
        layers = self._lora_layers()
        if layers is None:  # PEFT's calls, walking the model
            self._apply_full(tuner, weights, keys)
            return
        # The quick switch: the layers already hold PEFT's state for the previous stack with every adapter
        # weight frozen (inference mode), so only the names, the enabled flag and changed scales move.
        if not weights:
            if self._enabled:
                _warn_bias(tuner)
                for module in layers:
                    module._disable_adapters = True
                self._enabled = False
            return
        if not self._enabled:
            for module in layers:
                module._disable_adapters = False
            self._enabled = True
        for module in layers:
            if module._active_adapter != keys:
                module._active_adapter = keys  # one list shared by every layer, as PEFT's set_adapter leaves it
        tuner.active_adapter = keys
        for name, key in zip(weights, keys):
            w = float(weights[name])
            if self._scales.get(key) != w:
                for module in layers:
                    module.set_scale(key, w)
                self._scales[key] = w

    def _apply_full(self, tuner, weights: dict[str, float], keys: list[str]) -> None:
        """PEFT's calls: disable_adapter_layers, or enable + set_adapter(inference_mode=True) + set_scale;
        either leaves every adapter weight frozen, the state the quick switch starts from."""
        if not weights:
            tuner.disable_adapter_layers()
            self._enabled = False
        else:
            if not self._enabled:  # each toggle walks every module; skip it when nothing changes
                tuner.enable_adapter_layers()
                self._enabled = True
            tuner.set_adapter(keys, inference_mode=True)
            self._set_scales({key: float(w) for key, w in zip(keys, weights.values())})
        self._synced = True

    def _set_scales(self, scales: dict[str, float]) -> None:
        for module in self._layers if self._layers is not None else self.peft.modules():
            if isinstance(module, LoraLayer):
                for key, w in scales.items():
                    module.set_scale(key, w)
        self._scales.update(scales)

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
            layers = self._lora_layers()
            if layers is not None:
                for module in layers:
                    module._disable_adapters = False
            else:  # PEFT's enable also unfreezes the active adapters' weights: the next _apply resets them in full
                self.peft.base_model.enable_adapter_layers()
                self._synced = False
            self._enabled = True
        self._set_scales({peft_key(name): 1.0 for name in needed if self._scales.get(peft_key(name)) != 1.0})
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
            self._restructured()
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
            self._restructured()
            self._apply(previous)
        return target
