"""Two LoRA options whose meaning needs more than a field's choices (webui/options/config.py reads this module; it
imports nothing of ours but the errors, so config stays free of cycles):

- `init_lora_weights`: which of PEFT's initializations can run here, and which rewrite the base weights
  (PiSSA, OLoRA: the trainer converts their adapter so that it works on the original base);
- `layers_pattern` without `layers_to_transform`: seed 002's guide documents it as "a regular expression over
  layer names" (`transformer\\.h\\.\\d+\\.attn`: LoRA on the attention layers), while PEFT's `layers_pattern` is
  the name of the layer list that `layers_to_transform` indexes. We accept the seed's meaning — LoRA on the
  target modules inside the modules whose names match — and train it in PEFT's own form, `target_modules` as
  a regular expression, which is what the saved adapter_config.json holds and what the log shows.
"""
from __future__ import annotations

import re

from webui.errors import BadInput

# PEFT's values that need no data pass and no LoftQ copy of the base (plus pissa_niter_N)
INIT_LORA_WEIGHTS = (True, False, "gaussian", "orthogonal", "pissa", "olora")
INIT_REWRITES_BASE = ("pissa", "olora")  # prefixes: pissa_niter_N too
_INIT_REFUSED = {"eva": "it initializes from activations on the training data (PEFT's initialize_lora_eva_weights)",
                 "corda": "it needs a calibration pass over data (PEFT's preprocess_corda)",
                 "loftq": "it quantizes its own copy of the base; use training.quantization for QLoRA",
                 "mica": "it freezes B, which LoRA Deck's adapter stacks and blends do not expect"}
# layer types PEFT's "all-linear" adapts (bitsandbytes' Linear4bit / Linear8bitLt are nn.Linear subclasses)
_LINEAR_TYPES = ("Linear", "Conv1D")


def init_lora_weights(value):
    """Normalize an init_lora_weights value (the Training tab sends text: "true"/"false") or refuse it."""
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        value = value.strip().lower() == "true"
    if isinstance(value, str) and value.startswith("pissa_niter_") and value[12:].isdigit():
        return value
    if isinstance(value, bool) or isinstance(value, str) and value in INIT_LORA_WEIGHTS:
        return value
    reason = _INIT_REFUSED.get(str(value))
    raise BadInput(f"init_lora_weights: {value!r} " + (f"is not supported here: {reason}" if reason else
                   "is not one of: true, false, gaussian, orthogonal, pissa, pissa_niter_N, olora"))


def rewrites_base(value) -> bool:
    """Does this initialization change the base weights (so the saved adapter must be converted)?"""
    return isinstance(value, str) and value.startswith(INIT_REWRITES_BASE)


def starts_as_base(lora) -> bool:
    """Does a new adapter with these settings change nothing until trained (B starts at zero: PEFT's default and
    gaussian init), so that the model with it switched off is exactly the model with it as initialized?"""
    return lora.init_lora_weights in (True, "gaussian") and not lora.use_dora


def check_layers_regex(pattern) -> None:
    """A layers_pattern given without layers_to_transform must be one regular expression over module names."""
    try:
        re.compile(pattern if isinstance(pattern, str) else "(")
    except re.error as e:
        raise BadInput(f"layers_pattern: {pattern!r} is not a regular expression over module names ({e}); a list "
                       "of layer-list names (PEFT's meaning) is used together with layers_to_transform") from None


def yaml_hint(error) -> str:
    """What to do about a YAML error that a pasted regex causes: seed 002 writes its example in double quotes,
    where YAML reads `\\.` as an (unknown) escape and refuses the file."""
    if "unknown escape character" not in str(error):
        return ""
    return (" — in double quotes YAML reads backslashes as escapes; write a regular expression in single quotes, "
            "e.g. layers_pattern: 'transformer\\.h\\.\\d+\\.attn'")


def is_layers_regex(lora) -> bool:
    """Is `lora` (a LoraTrainConfig) using seed 002's layers_pattern (a regex, no layers_to_transform)?"""
    return isinstance(lora.layers_pattern, str) and lora.layers_to_transform is None


def peft_config(lora, model, log=print):
    """PEFT's LoraConfig for `lora` on `model`; seed 002's layers_pattern regex becomes PEFT's form (a
    target_modules regex), checked against the model's module names so that a pattern matching nothing is
    refused with the names it could have matched."""
    if not is_layers_regex(lora):
        return lora.peft_config()
    pattern = lora.layers_pattern
    inside = re.compile(rf"(?:.*\.)?(?:{pattern})\.(?:.*\.)?([^.]+)")
    names = [n for n, _ in model.named_modules() if n]
    matched = [n for n in names if re.fullmatch(rf"(?:.*\.)?(?:{pattern})", n)]
    if not matched:
        examples = sorted({re.sub(r"\.\d+\.", r".N.", n) for n in names if ".0." in n and n.count(".") <= 4})[:6]
        raise BadInput(f"lora.layers_pattern {pattern!r} (seed 002's form: a regular expression over module names) "
                       f"matches no module of this model; its modules are named like {', '.join(examples)}")
    wanted = lora.target_modules
    leaves = set()
    for name, module in model.named_modules():
        found = inside.fullmatch(name)
        if found and (type(module).__name__ in _LINEAR_TYPES if wanted == "all-linear" else found.group(1) in wanted):
            leaves.add(found.group(1))
    if not leaves:
        raise BadInput(f"lora.layers_pattern {pattern!r} matches {len(matched)} module(s) (e.g. {matched[0]}), but "
                       f"none of them holds the target modules {wanted}")
    regex = rf"(?:.*\.)?(?:{pattern})\.(?:.*\.)?(?:{'|'.join(sorted(leaves))})"
    log(f"lora.layers_pattern {pattern!r}: LoRA on {', '.join(sorted(leaves))} inside the {len(matched)} matching "
        f"module(s); in PEFT's form: target_modules: {regex!r}, layers_pattern: null")
    return lora.peft_config(target_modules=regex, layers_pattern=None)
