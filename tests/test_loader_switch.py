"""What works on each loader (issue 29, item 5): the same model loaded again — on another loader, or with other
settings — keeps its active adapters where the new loader can apply them, and another model starts plain; the
exact `cat` blend is made on llama.cpp too (from the adapters' files), equal to plain PEFT's cat blend; the
other blends and an in-memory merge are refused there with what works instead."""
import pytest

from tests.helpers import PROMPT, peft_reference
from webui.engine import Engine
from webui.errors import Unsupported
from webui.options.config import GenerationParams, ModelSpec
from webui.testing.tiny_models import write_adapter

GREEDY = GenerationParams(max_new_tokens=12, temperature=0.0)


def test_the_same_model_reloaded_keeps_its_stack_and_another_starts_plain(tiny_models, llama_loras, tmp_path):
    base = tiny_models["llama"]
    engine = Engine(base.parent, llama_loras)
    engine.load(ModelSpec(model=base.name, loader="transformers", dtype="float32"))
    engine.set_adapters({"A": 1.0, "B": 0.5})
    result = engine.load(ModelSpec(model=base.name, loader="transformers", dtype="float32", device="cpu"))
    assert result.kept == {"A": 1.0, "B": 0.5} and engine.active_adapters == {"A": 1.0, "B": 0.5}
    want = peft_reference(base, {"A": (llama_loras / "A", 1.0), "B": (llama_loras / "B", 0.5)}, PROMPT, 12)[0]
    assert engine.generate(PROMPT, GREEDY) == want

    result = engine.load(ModelSpec(model="tiny-mistral", loader="transformers", dtype="float32"))
    assert result.kept == {} and result.dropped == "" and engine.active_adapters == {}


def test_switching_the_embedded_model_from_llamacpp_to_transformers_keeps_the_stack(embedded_folder, tmp_path):
    models, loras = tmp_path / "models", tmp_path / "loras"
    models.mkdir()
    (models / embedded_folder.name).symlink_to(embedded_folder, target_is_directory=True)  # converted once
    write_adapter(embedded_folder, loras / "A", target_modules=["q_proj", "v_proj"], r=4, seed=5)
    engine = Engine(models, loras)
    engine.load(ModelSpec(model="", loader="llamacpp"))  # the embedded model on its default loader
    engine.set_adapters({"A": 0.75})
    with pytest.raises(Unsupported, match="export a merged GGUF.*transformers loader"):
        engine.merge_adapters()  # what works instead is named
    result = engine.load(ModelSpec(model="", loader="transformers", dtype="float32"))
    assert result.kept == {"A": 0.75}
    engine.merge_adapters()  # what the user switched for
    assert engine.merged and engine.active_adapters == {"A": 0.75}


def test_cat_blend_on_llamacpp_equals_pefts(gguf_models, llama_loras, tmp_path):
    engine = Engine(gguf_models, llama_loras)
    engine.load(ModelSpec(model="tiny-llama.gguf", loader="llamacpp"))
    engine.set_adapters({"A": 1.0})
    with pytest.raises(Unsupported, match="`cat` \\(exact\\) works on every loader"):
        engine.blend_adapters({"A": 1.0, "B": 0.5}, "AB-ties", "ties", density=0.5, out_dir=tmp_path)
    out = engine.blend_adapters({"A": 1.0, "B": 0.5}, "AB", "cat", out_dir=tmp_path)
    assert out == tmp_path / "AB" and engine.active_adapters == {"A": 1.0}  # the stack is as it was

    hf = gguf_models / "tiny-llama"
    stacked = peft_reference(hf, {"A": (llama_loras / "A", 1.0), "B": (llama_loras / "B", 0.5)}, PROMPT, 12,
                             combine="cat")
    blended = peft_reference(hf, {"AB": (out, 1.0)}, PROMPT, 12)
    assert blended[0] == stacked[0]
    assert (blended[1] - stacked[1]).abs().max() < 1e-4  # the same update, as one adapter
    # and on llama.cpp itself the blend answers as the stack does
    engine.prepare_adapters(["A", "B"])
    engine.prepare_adapters(["AB"], {"AB": out})
    assert engine.generate(PROMPT, GREEDY, adapters={"AB": 1.0}) == \
        engine.generate(PROMPT, GREEDY, adapters={"A": 1.0, "B": 0.5})
