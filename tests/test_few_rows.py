"""webui/backends/hf/few_rows.py: the W·xᵀ form of a decode step's Linear layers gives nn.Linear's values (to float32
rounding) and only inside rows_product(), for 2-16 rows; outside, the layers compute exactly as nn.Linear; it is
installed on the base's layers and never on LoRA's A and B, only where it was measured faster; and a continuous
batch using it still gives every request its own greedy text (the full check is tests/test_continuous_batching.py)."""
import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from webui.backends.hf import few_rows
from webui.testing.tiny_models import build_model, build_tokenizer


@pytest.mark.parametrize("bias", [False, True])
def test_values_equal_nn_linear_and_only_inside(bias):
    torch.manual_seed(0)
    plain = nn.Linear(96, 80, bias=bias)
    ours = nn.Linear(96, 80, bias=bias)
    ours.load_state_dict(plain.state_dict())
    ours.__class__ = few_rows.FewRowsLinear
    with torch.inference_mode():
        for shape in [(1, 96), (2, 96), (4, 1, 96), (16, 96), (17, 96), (3, 5, 96)]:
            x = torch.randn(*shape)
            assert torch.equal(ours(x), plain(x))  # outside rows_product: nn.Linear itself
            with few_rows.rows_product():
                got = ours(x)
            assert got.shape == plain(x).shape
            assert got.is_contiguous()  # as F.linear's: in-place users (xgrammar's token mask) need that
            torch.testing.assert_close(got, plain(x), rtol=1e-5, atol=1e-5)
    x = torch.randn(4, 96, requires_grad=True)
    with few_rows.rows_product():  # autograd on: nn.Linear's own path
        assert torch.equal(ours(x), plain(x))


@pytest.mark.parametrize("faster", [True, False])
def test_installed_on_base_layers_not_on_lora_and_only_when_faster(faster, monkeypatch):
    tok = build_tokenizer()
    model = get_peft_model(build_model("llama", tok), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    monkeypatch.setattr(few_rows, "_faster_transposed", lambda weight: faster)
    assert few_rows.install(model) is faster
    for name, m in model.named_modules():
        if ".lora_A." in name or ".lora_B." in name:
            assert type(m) is nn.Linear, name  # the quick LoRA forward needs them plain
        elif name.endswith(("base_layer", "k_proj", "o_proj", "lm_head")):
            assert (type(m) is few_rows.FewRowsLinear) is faster, name
    monkeypatch.setattr(few_rows, "_faster_transposed", lambda weight: not faster)
    assert few_rows.install(model) is faster  # decided once per model
