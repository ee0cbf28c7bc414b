"""The quick paths of webui/adapters/peft_stack.py against plain PEFT computed here: switching the active
stack (LoRA layers collected once, only what changed is set) must leave every LoRA layer exactly as PEFT's
own calls leave it (active names, enabled flag, every adapter's scaling, requires_grad) and give the same
logits; the LoRA layers' inference forward, also for mixed batches, must return exactly what PEFT's forward
returns, and hand every case it does not cover (DoRA, training, disabled layers, hooks) to PEFT."""
import pytest
import torch
from peft import PeftModel
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora import LoraLayer
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.helpers import PROMPT
from webui.adapters.peft_stack import peft_key
from webui.engine import Engine
from webui.options.config import ModelSpec
from webui.testing.tiny_models import write_adapter

# A: attention r=4; B: all-linear r=8; C: rsLoRA with dropout (identity in eval mode); D: a LoRA bias on B.
ADAPTERS = {
    "A": {"target_modules": ["q_proj", "v_proj"], "r": 4, "alpha": 8, "seed": 1},
    "B": {"target_modules": "all-linear", "r": 8, "alpha": 16, "seed": 2},
    "C.v1": {"target_modules": ["q_proj", "o_proj", "down_proj"], "r": 4, "alpha": 4, "seed": 3,
             "lora_dropout": 0.1, "use_rslora": True},
    "D": {"target_modules": ["k_proj", "up_proj"], "r": 2, "alpha": 2, "seed": 4, "lora_bias": True},
}
SEQUENCE = [{"A": 1.0}, {"B": 1.0}, {"A": 1.0}, {"A": 1.0, "B": 0.5}, {}, {"B": 0.5}, {"C.v1": 1.0},
            {"A": 0.25, "C.v1": 2.0, "D": 1.0}, {}, {}, {"D": 1.0}, {"A": 1.0}, {"A": 0.5}, {"B": 1.0, "A": 1.0}]


@pytest.fixture
def setup(tiny_models, tmp_path):
    base = tiny_models["llama"]
    loras = tmp_path / "loras"
    for name, kw in ADAPTERS.items():
        write_adapter(base, loras / name, **kw)
    engine = Engine(base.parent, loras)
    engine.load(ModelSpec(model="tiny-llama"))
    for name in ADAPTERS:  # all cached
        engine.set_adapters({name: 1.0})
    return engine, base, loras


def _reference(base, loras):
    """Plain PEFT with the same adapters, switched with PEFT's own calls (what the stack did before)."""
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    names = list(ADAPTERS)
    peft = PeftModel.from_pretrained(model, str(loras / names[0]), adapter_name=peft_key(names[0]))
    for n in names[1:]:
        peft.load_adapter(str(loras / n), adapter_name=peft_key(n))
    peft.eval()
    state = {"enabled": True}

    def apply(weights):
        tuner = peft.base_model
        if not weights:
            tuner.disable_adapter_layers()
            state["enabled"] = False
            return
        if not state["enabled"]:
            tuner.enable_adapter_layers()
            state["enabled"] = True
        tuner.set_adapter([peft_key(n) for n in weights], inference_mode=True)
        for module in peft.modules():
            if isinstance(module, LoraLayer):
                for n, w in weights.items():
                    module.set_scale(peft_key(n), float(w))
    return peft, apply


def _layer_state(model) -> dict:
    return {name: (list(m.active_adapters), m.disable_adapters, dict(m.scaling))
            for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def _grads(model) -> dict:
    return {name: p.requires_grad for name, p in model.named_parameters()}


def _logits(model, tok):
    with torch.no_grad():
        return model(**tok(PROMPT, return_tensors="pt")).logits[0]


def test_switching_leaves_the_layers_as_peft_does_and_the_same_logits(setup):
    engine, base, loras = setup
    stack = engine._backend.adapters
    tok = AutoTokenizer.from_pretrained(str(base))
    ref, apply = _reference(base, loras)
    for weights in SEQUENCE:
        engine.set_adapters(weights)
        apply(weights)
        assert stack._lora_layers() is not None, "the quick switch should apply to these adapters"
        ours_state, ref_state = _layer_state(stack.peft), _layer_state(ref)
        assert ours_state == ref_state, weights
        assert _grads(stack.peft) == _grads(ref), weights
        assert torch.equal(_logits(stack.peft, tok), _logits(ref, tok)), weights


def test_merge_and_blend_then_switch_still_match_peft(setup):
    engine, base, loras = setup
    stack = engine._backend.adapters
    tok = AutoTokenizer.from_pretrained(str(base))
    ref, apply = _reference(base, loras)
    engine.set_adapters({"A": 1.0, "B": 0.5})
    engine.merge_adapters()
    engine.set_adapters({"B": 1.0})  # unmerges, then switches
    engine.blend_adapters({"A": 1.0, "B": 0.5}, "AB", combination_type="cat")
    engine.set_adapters({"A": 0.5})
    # the same calls, as PEFT's: the engine's blend activates the sources, the stack's blend sets each to 1
    # (add_weighted_adapter reads the layers' scaling) and both restore what was active
    apply({"A": 1.0, "B": 0.5})
    ref.base_model.merge_adapter(safe_merge=True)  # merged and unmerged as the stack does (same rounding)
    ref.base_model.unmerge_adapter()
    for weights in ({"B": 1.0}, {"A": 1.0, "B": 0.5}, {"A": 1.0, "B": 1.0}, {"A": 1.0, "B": 0.5}, {"B": 1.0},
                    {"A": 0.5}):
        apply(weights)
    assert _layer_state(stack.peft) == _layer_state(ref)
    assert _grads(stack.peft) == _grads(ref)
    assert torch.equal(_logits(stack.peft, tok), _logits(ref, tok))


@pytest.mark.parametrize("weights", [{"A": 1.0}, {"B": 0.5}, {"A": 1.0, "B": 0.5}, {"C.v1": 1.0},
                                     {"D": 1.0}, {"A": 0.25, "C.v1": 2.0, "D": 1.0}])
def test_quick_forward_returns_exactly_what_peft_returns(setup, weights):
    engine, _, _ = setup
    engine.set_adapters(weights)
    layers = [m for m in engine._backend.adapters.peft.modules() if isinstance(m, LoraLinear)]
    assert layers and all(type(m).forward is not LoraLinear.forward for m in layers)  # the quick forward is in use
    torch.manual_seed(0)
    with torch.inference_mode():
        for m in layers:
            x = torch.randn(2, 3, m.in_features)
            assert torch.equal(m(x), LoraLinear.forward(m, x)), m


def test_cases_the_quick_forward_does_not_cover_go_to_peft(setup, monkeypatch):
    engine, _, _ = setup
    engine.set_adapters({"A": 1.0, "B": 0.5})
    stack = engine._backend.adapters
    m = next(m for m in stack.peft.modules() if isinstance(m, LoraLinear) and "A" in m.lora_A)
    x = torch.randn(2, 3, m.in_features)
    calls = []
    peft_forward = LoraLinear.forward
    monkeypatch.setattr(LoraLinear, "forward", lambda self, *a, **k: calls.append(1) or peft_forward(self, *a, **k))
    with torch.no_grad():
        m(x)
        assert not calls  # the common case: the quick forward
        m(x, adapter_names=["A", "__base__"])  # a mixed batch: quick too
        assert not calls
        m.train()
        m(x)  # training mode (dropout)
        m.eval()
        assert len(calls) == 1
        handle = m.lora_A["A"].register_forward_hook(lambda *a: None)
        m(x)  # a hook on a LoRA module must run
        m(x, adapter_names=["A", "__base__"])
        handle.remove()
        assert len(calls) == 3
    m(x)  # autograd on (PEFT's modules, and their backward hooks if any)
    assert len(calls) == 4
    engine.set_adapters({})
    with torch.no_grad():
        assert torch.equal(m(x), m.base_layer(x))  # disabled: the base alone, through PEFT
    assert len(calls) == 5


@pytest.mark.parametrize("names", [["A", "__base__"], ["B", "B", "B"], ["A", "B", "__base__", "C.v1", "B", "D"],
                                   ["__base__", "__base__"], ["D", "A"]])
def test_quick_mixed_batch_returns_exactly_what_peft_returns(setup, names):
    """Each row its adapter (PEFT's `adapter_names`, as the continuous batch runs): the same numbers as PEFT's
    _mixed_batch_forward, in every LoRA layer."""
    engine, _, _ = setup
    stack = engine._backend.adapters
    torch.manual_seed(0)
    with stack.mixed(names) as keys, torch.inference_mode():
        layers = [m for m in stack.peft.modules() if isinstance(m, LoraLinear)]
        assert layers and all(type(m).forward is not LoraLinear.forward for m in layers)
        for m in layers:
            x = torch.randn(len(keys), 3, m.in_features)
            assert torch.equal(m(x, adapter_names=keys), LoraLinear.forward(m, x, adapter_names=keys)), m


@pytest.mark.parametrize("weights", [{"A": 1.0}, {"A": 1.0, "B": 0.5}])
def test_quick_forward_on_gptq_layers_returns_exactly_what_peft_returns(gptq_dirs, weights):
    from peft.tuners.lora.gptq import GPTQLoraLinear

    models, loras = gptq_dirs
    engine = Engine(models, loras)
    engine.load(ModelSpec(model="tiny-gptq"))
    try:
        engine.set_adapters(weights)
        stack = engine._backend.adapters
        layers = [m for m in stack.peft.modules() if isinstance(m, GPTQLoraLinear)]
        assert layers and all(type(m).forward is not GPTQLoraLinear.forward for m in layers)
        # the GPTQ loader's mixed-batch shim (an instance forward) wraps the quick forward, not PEFT's
        shimmed = [m for m in layers if "forward" in vars(m)]
        assert all(vars(m)["forward"].plain_forward.__func__ is type(m).forward for m in shimmed)
        torch.manual_seed(0)
        with torch.inference_mode():
            for m in layers:
                x = torch.randn(2, 3, m.in_features)
                assert torch.equal(m(x), GPTQLoraLinear.forward(m, x)), m
        assert stack._lora_layers() is not None  # and switching is the quick one
    finally:
        engine.unload()
