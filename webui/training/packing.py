"""Padding-free sample packing (`training.packing`): the samples of a batch are concatenated into one row with
transformers' DataCollatorWithFlattening, their position ids restarting at 0 for each sample and the first label
of each sample ignored, so no token is padding and no loss crosses a sample boundary.

Samples must not attend to each other: with no attention mask and no KV cache, transformers 5 (masking_utils:
find_packed_sequence_indices) reads the sample boundaries off the restarting position ids and builds a
block-diagonal causal mask for sdpa and eager attention (flash attention reads them off the same ids). So the
model must take position ids, and its cache must be off while training: with `use_cache` on, the forward pass
creates a cache and the packed mask is skipped, which lets samples see each other.
"""
from __future__ import annotations

import inspect

from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening

from webui.errors import Unsupported


def collator(tokenizer, packing: bool):
    """The Trainer's data collator: packed into one row, or padded to the longest sample of the batch."""
    if packing:
        return DataCollatorWithFlattening(return_position_ids=True, separator_id=-100)
    return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)


def prepare_model(model) -> None:
    """Make `model` (before PEFT wraps it) train correctly on packed rows, or refuse: an architecture without
    position ids (ALiBi models such as Bloom) would let the packed samples attend to each other."""
    base = getattr(model, "get_base_model", lambda: model)()
    inner = getattr(base, "model", None) or getattr(base, "transformer", None) or base
    if "position_ids" not in inspect.signature(inner.forward).parameters:
        raise Unsupported(f"training.packing: {type(base).__name__} takes no position ids, so samples packed into one "
                          "row would attend to each other; set packing: false for this model")
    base.config.use_cache = False  # a cache in the forward pass turns off the packed (block-diagonal) mask
