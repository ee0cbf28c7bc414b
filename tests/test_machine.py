"""What the machine can hold (webui/backends/machine.py): `--dtype auto` on CPU keeps a bf16 checkpoint in bf16
where the CPU computes bf16 (or where float32 would not fit), a load that cannot fit is refused up front with
both figures while the loaded model keeps answering, and the Model tab's estimate."""
from __future__ import annotations

import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.helpers import bf16_copy
from webui.backends import machine
from webui.backends.hf.transformers import pick_dtype
from webui.engine import Engine
from webui.errors import Unsupported
from webui.options.config import GenerationParams, ModelSpec

GREEDY = GenerationParams(temperature=0, max_new_tokens=4)


@pytest.fixture(scope="module")
def folders(tiny_models, tmp_path_factory):
    """models/: tiny-llama (float32) and tiny-llama-bf16 (the same model saved in bf16)."""
    models = tmp_path_factory.mktemp("machine") / "models"
    shutil.copytree(tiny_models["llama"], models / "tiny-llama")
    bf16_copy(tiny_models["llama"], models / "tiny-llama-bf16")
    return models


def test_auto_dtype_on_cpu(folders, monkeypatch):
    bf16, f32 = folders / "tiny-llama-bf16", folders / "tiny-llama"
    assert machine.source_dtype(bf16) == "bfloat16" and machine.source_dtype(f32) == "float32"
    monkeypatch.setattr(machine, "cpu_computes_bf16", lambda: True)
    assert pick_dtype("auto", "cpu", bf16) == torch.bfloat16
    assert pick_dtype("auto", "cpu", f32) == torch.float32
    assert pick_dtype("float32", "cpu", bf16) == torch.float32  # asked for: kept
    monkeypatch.setattr(machine, "cpu_computes_bf16", lambda: False)
    assert pick_dtype("auto", "cpu", bf16) == torch.float32  # fits: float32 computes faster on this CPU
    between = (machine.load_need(bf16, 2) + machine.load_need(bf16, 4)) // 2
    monkeypatch.setattr(machine, "available", lambda: between)
    assert pick_dtype("auto", "cpu", bf16) == torch.bfloat16  # float32 would not fit; bf16 does


def test_estimates_follow_the_headers(folders):
    f32 = folders / "tiny-llama"
    params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(str(f32)).parameters())
    assert machine.parameters(f32) in (params, params + machine.tensor_sizes(f32)["model.embed_tokens.weight"][1])
    assert machine.load_need(f32, 4) > machine.load_need(f32, 2) > machine.PROCESS_FLOOR


def test_a_load_that_cannot_fit_is_refused_and_the_model_stays(folders, monkeypatch):
    engine = Engine(folders, folders.parent / "loras")
    engine.load(ModelSpec(model="tiny-llama", loader="transformers", device="cpu"))
    before = engine.generate("Hello", GREEDY)
    held = engine._backend.memory_held()
    assert held == sum(p.numel() * 4 for p in engine._backend.model.parameters())
    need, free = engine.memory_estimate(ModelSpec(model="tiny-llama-bf16", loader="transformers", dtype="float32",
                                                  device="cpu"))
    assert need == machine.load_need(folders / "tiny-llama-bf16", 4) and free >= held
    monkeypatch.setattr(machine, "available", lambda: 1000)
    with pytest.raises(Unsupported, match=r"loading tiny-llama-bf16 \(transformers\) needs about 0\.\d GB of memory "
                                          r"and 0\.0 GB is free \(counting the memory the model loaded now would"):
        engine.load(ModelSpec(model="tiny-llama-bf16", loader="transformers", dtype="float32", device="cpu"))
    assert engine.loaded.name == "tiny-llama" and engine.generate("Hello", GREEDY) == before
    # what the current model frees counts: with it, the same load fits
    monkeypatch.setattr(machine, "available", lambda: machine.load_need(folders / "tiny-llama-bf16", 4) - held + 1)
    engine.load(ModelSpec(model="tiny-llama-bf16", loader="transformers", dtype="float32", device="cpu"))
    assert engine.loaded.name == "tiny-llama-bf16"
    assert engine.memory_estimate(ModelSpec(model="", loader="auto")) is None  # the embedded model: not estimated
    engine.unload()


def test_a_bf16_checkpoint_loaded_as_float32_has_the_same_weights(folders):
    """Loaded in bf16 and widened a weight at a time (its pages of the file dropped): every weight equals plain
    transformers loading the checkpoint straight into float32, and the answers match."""
    from tests.helpers import reference_greedy

    engine = Engine(folders, folders.parent / "loras")
    engine.load(ModelSpec(model="tiny-llama-bf16", loader="transformers", dtype="float32", device="cpu"))
    ours = engine._backend.model.state_dict()
    plain = AutoModelForCausalLM.from_pretrained(str(folders / "tiny-llama-bf16"), dtype=torch.float32).state_dict()
    assert set(ours) == set(plain) and all(ours[k].dtype == torch.float32 for k in ours)
    for key, value in plain.items():
        assert torch.equal(ours[key], value), key
    assert engine.generate("Hello", GREEDY) == reference_greedy(folders / "tiny-llama-bf16", "Hello", 4)
    engine.unload()
