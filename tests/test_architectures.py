"""Every tiny architecture of seed 000's table loads through the Engine on the transformers loader and
generates; greedy output equals a plain `model.generate`, and streaming yields the same text."""
import pytest

from tests.helpers import reference_greedy
from webui.engine import Engine
from webui.options.config import GenerationParams, ModelSpec
from webui.testing.tiny_models import ARCHITECTURES

PROMPT = "The quick brown fox"
GREEDY = GenerationParams(temperature=0, max_new_tokens=16)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_architecture_loads_and_matches_plain_transformers(arch, tiny_models, models_dir):
    engine = Engine(models_dir)
    result = engine.load(ModelSpec(model=f"tiny-{arch}", loader="transformers"))
    assert result.info.loader == "transformers" and result.info.device == "cpu"

    expected = reference_greedy(tiny_models[arch], PROMPT, GREEDY.max_new_tokens)
    assert expected.strip(), "the reference produced nothing; the comparison would be empty"
    assert engine.generate(PROMPT, GREEDY) == expected
    assert "".join(engine.stream(PROMPT, GREEDY)) == expected

    # the chat template of the tokenizer is what the Engine renders for a chat
    prompt = engine.chat_prompt([{"role": "user", "content": "hi"}])
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
