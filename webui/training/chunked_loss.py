"""The training loss a slice of tokens at a time, so that the whole logits tensor never exists.

transformers' causal LMs apply the output layer to every position and then compute the loss (ForCausalLMLoss),
which upcasts all the logits to float32 and keeps their log-softmax for the backward pass: batch x length x vocab
floats, several times over (0.4 GB per copy for 8 x 256 tokens of a 49k vocabulary, 4 GB at 8 x 1024 x 128k). Here
the model runs with `logits_to_keep=1`, and the loss is made from its last hidden state (the only one it returns): only the labelled
positions, a slice at a time, each slice's logits made by the model's own output layer inside
torch.utils.checkpoint and made again in the backward pass (one more pass of the output layer, a few % of a step).
The libraries that do this (Liger's fused linear cross-entropy, Unsloth's) are CUDA/Triton kernels; this is the
smallest portable form of it.

It is used only where it gives the model's own logits: `fits` checks that once per run, so a model whose forward
does more than `output_layer(last hidden state)` (logit soft-capping or scaling) keeps transformers' loss.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE = -100
SLICE_ELEMENTS = 1 << 23  # logits per slice: 32 MB in float32 whatever the vocabulary
# transformers returns only this hidden state (the others are None): under mixed precision accelerate copies every
# returned tensor to float32, which for all layers' states would cost as much as the logits
LAST = -1


def fits(model, ids: list[int]) -> bool:
    """Whether `model` takes `logits_to_keep` and its logits are its output layer applied to the last of its
    hidden states (checked on up to 16 tokens of `ids`, in eval mode, without gradients)."""
    if len(ids) < 2:
        return False
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        x = torch.tensor([ids[:16]], device=device)
        with torch.no_grad():
            full = model(input_ids=x).logits.float()
            last = model(input_ids=x, logits_to_keep=1, output_hidden_states=LAST)
            made = model.get_output_embeddings()(last.hidden_states[-1]).float()
    except Exception:  # noqa: BLE001 - no logits_to_keep, no hidden states, no head, a kernel that fails: the plain loss
        return False
    finally:
        model.train(was_training)
    return (last.logits.shape[1] == 1 and made.shape == full.shape
            and torch.allclose(made, full, rtol=1e-3, atol=1e-3 * float(full.abs().max().clamp(min=1))))


def _slice_sum(head, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), labels, ignore_index=IGNORE, reduction="sum")


def causal_lm_loss(head, vocab_size: int, hidden: torch.Tensor, labels: torch.Tensor,
                   num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor:
    """ForCausalLMLoss's value (position t predicts label t+1; the sum over `num_items_in_batch` when the Trainer
    gives it, for gradient accumulation, else the mean) from the last hidden state `hidden` [batch, length, dim]
    and the output layer `head` (`vocab_size` outputs)."""
    labels = F.pad(labels.to(hidden.device), (0, 1), value=IGNORE)[..., 1:].reshape(-1)
    flat = hidden.reshape(-1, hidden.shape[-1])
    kept = labels != IGNORE
    flat, labels = flat[kept], labels[kept]  # positions without a label never reach the output layer
    step = max(1, SLICE_ELEMENTS // vocab_size)
    total = hidden.sum() * 0  # a zero in the graph: a batch with no labels still backpropagates
    for i in range(0, len(labels), step):
        total = total + checkpoint(_slice_sum, head, flat[i:i + step], labels[i:i + step], use_reentrant=False)
    if num_items_in_batch is None:
        return total / kept.sum()
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch
