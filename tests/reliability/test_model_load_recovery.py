"""A model load that fails after the cheap checks (the real load raises) must leave the app as it was: the
previous model loaded again WITH its active adapters, their weights and the merge, answering exactly as
plain PEFT does with that weighted stack. (Before this was fixed the previous base came back bare.)"""
import json
import shutil

import pytest

from tests.helpers import GREEDY, PROMPT, peft_reference
from webui.engine import Engine
from webui.errors import LoadFailed
from webui.options.config import ModelSpec

STACK = {"A": 0.7, "B": 0.4}


@pytest.fixture
def setup(scratch_models, tmp_path):
    from webui.testing.tiny_models import write_adapter

    loras = tmp_path / "loras"
    base = scratch_models / "tiny-llama"
    write_adapter(base, loras / "A", target_modules=["q_proj", "v_proj"], r=4, alpha=8, seed=1)
    write_adapter(base, loras / "B", target_modules="all-linear", r=8, alpha=16, seed=2)
    # shapes that do not match the config pass preflight but fail the real load
    broken = scratch_models / "wrong-shapes"
    shutil.copytree(base, broken)
    cfg = json.loads((broken / "config.json").read_text())
    cfg["intermediate_size"] = 48
    (broken / "config.json").write_text(json.dumps(cfg))
    return scratch_models, loras


@pytest.mark.parametrize("merged", [True, False], ids=["merged", "unmerged"])
def test_failed_load_restores_model_with_stack_and_merge(setup, merged):
    models, loras = setup
    expected = peft_reference(models / "tiny-llama", {n: (loras / n, w) for n, w in STACK.items()}, PROMPT,
                              GREEDY.max_new_tokens)[0]
    plain = peft_reference(models / "tiny-llama", {"A": (loras / "A", 1.0)}, PROMPT, GREEDY.max_new_tokens)[0]
    assert plain != expected  # the stack's weights matter, so a wrong restore would show
    engine = Engine(models, loras)
    engine.load(ModelSpec(model="tiny-llama"))
    engine.set_adapters(STACK)
    if merged:
        engine.merge_adapters()
    assert engine.generate(PROMPT, GREEDY) == expected

    with pytest.raises(LoadFailed, match="wrong-shapes"):
        engine.load(ModelSpec(model="wrong-shapes"))

    assert engine.loaded.name == "tiny-llama"
    assert engine.active_adapters == STACK
    assert engine.merged is merged
    assert engine.generate(PROMPT, GREEDY) == expected
    engine.unmerge_adapters()  # and the stack still works as a stack: unmerged, then switched
    assert engine.generate(PROMPT, GREEDY) == expected
    engine.set_adapters({"A": 1.0})
    assert engine.generate(PROMPT, GREEDY) == plain
