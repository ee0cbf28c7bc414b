"""The training loss made a slice of tokens at a time (webui/training/chunked_loss.py) equals transformers' own
loss, and gives the adapter the same gradients, on several architectures, with masked prompt tokens, padding and
the Trainer's num_items_in_batch; a model whose logits are more than its output layer's (Cohere's logit scale)
is recognised and keeps transformers' loss."""
import pytest
import torch
from peft import LoraConfig, get_peft_model

from webui.testing.tiny_models import build_model, build_tokenizer
from webui.training import chunked_loss


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def _peft(arch, tok):
    model = build_model(arch, tok, seed=3)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0,
                                            init_lora_weights=False))
    peft.train()
    return peft


def _batch(tok):
    texts = ["user: what is the capital of France? assistant: Paris is the capital.", "Models, tokens, layers."]
    enc = tok(texts, padding=True, return_tensors="pt")
    labels = enc["input_ids"].clone()
    labels[enc["attention_mask"] == 0] = -100  # padding
    labels[0, :6] = -100  # a prompt that is not trained
    return enc["input_ids"], enc["attention_mask"], labels


def _grads(peft):
    return {n: p.grad.clone() for n, p in peft.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("arch", ["llama", "gemma", "gpt2", "qwen2"])
@pytest.mark.parametrize("num_items", [None, 37])
def test_loss_and_gradients_equal_transformers(tok, arch, num_items, monkeypatch):
    peft = _peft(arch, tok)
    ids, mask, labels = _batch(tok)
    assert chunked_loss.fits(peft, ids[0].tolist())
    extra = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}
    torch.manual_seed(0)  # GPT-2 has dropout: the same masks in both passes
    want = peft(input_ids=ids, attention_mask=mask, labels=labels, **extra).loss
    want.backward()
    want_grads = _grads(peft)
    peft.zero_grad(set_to_none=True)

    vocab = peft.config.get_text_config().vocab_size if hasattr(peft.config, "get_text_config") else len(tok)
    monkeypatch.setattr(chunked_loss, "SLICE_ELEMENTS", vocab * 7)  # slices of 7 tokens: several, the last short
    torch.manual_seed(0)
    out = peft(input_ids=ids, attention_mask=mask, logits_to_keep=1, output_hidden_states=True)
    assert out.logits.shape[1] == 1  # the whole logits were never made
    got = chunked_loss.causal_lm_loss(peft.get_output_embeddings(), vocab, out.hidden_states[-1], labels,
                                      extra.get("num_items_in_batch"))
    got.backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    got_grads = _grads(peft)
    assert got_grads.keys() == want_grads.keys() and got_grads
    for name, g in want_grads.items():
        torch.testing.assert_close(got_grads[name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_a_batch_without_labels_gives_zero_and_still_backpropagates(tok):
    peft = _peft("llama", tok)
    ids, mask, labels = _batch(tok)
    out = peft(input_ids=ids, attention_mask=mask, logits_to_keep=1, output_hidden_states=True)
    loss = chunked_loss.causal_lm_loss(peft.get_output_embeddings(), len(tok), out.hidden_states[-1],
                                       torch.full_like(labels, -100), num_items_in_batch=1)
    loss.backward()
    assert loss.item() == 0


def test_scaled_logits_keep_the_standard_loss(tok):
    peft = _peft("cohere", tok)  # Cohere multiplies its logits by config.logit_scale
    ids, _, _ = _batch(tok)
    assert not chunked_loss.fits(peft, ids[0].tolist())
    assert peft.training  # the check puts the model back in training mode
