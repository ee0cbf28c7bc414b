"""Continuous (iteration-level) batching for the transformers-family loaders (float, GPTQ, bitsandbytes): a
request joins the running batch at the next decode step and leaves as soon as it is done, each row with its
own adapter and its own sampling settings.

transformers 5 has continuous batching of its own (`generate_batch`), but it packs every request into one
ragged row for paged attention, and PEFT's per-row adapters (`adapter_names`) need a batch dimension; so this
is the small loop on top of the model's forward and a DynamicCache that those need:
- newcomers' prompts are prefilled before each decode step, into a cache of their own: short ones that arrive
  together in one left-padded pass, a long one alone in chunks of PREFILL_CHUNK tokens, one chunk per step (a
  long prompt does not stall the others for long);
- its cache then joins the batch's, left-padded to the same length (the attention mask hides the padding;
  each row's positions are its own), and every step feeds one token per row;
- a row that leaves is dropped from the cache, and columns that only padding still uses are cut away.
Adapters: rows that use the plain base or one adapter at weight 1 share the batch through PEFT's mixed batch
(one adapter per row); a weighted stack is made active on the model and only requests with that same stack
join it. A batch that starts with the UI's own active stack (merged or not) runs on it as it is, and turns
into a mixed batch when a request for another single adapter arrives.
"""
from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from webui.adapters.peft_stack import peft_key
from webui.backends.base import Decoder, restore_stack
from webui.backends.hf import few_rows
from webui.backends.hf.sampling import RowSampler
from webui.errors import BadInput
from webui.options.config import GenerationParams

PREFILL_CHUNK = 256  # prompt tokens per prefill pass: about one decode step of 8 rows on a small CPU model


def eos_ids(model, tokenizer) -> set[int]:
    """Every token id that ends a reply: the generation config's (one or a list) and the tokenizer's."""
    ids = model.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, (list, tuple)) else [ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


@dataclass
class _Row:
    ids: list[int]           # the prompt, then the reply so far
    prompt_len: int
    name: str                # its adapter in a mixed batch, as PEFT knows it ("__base__" = none)
    sampler: RowSampler
    cache: DynamicCache | None = None  # its own cache while the prompt is prefilled
    prefilled: int = 0
    shown: int = 0           # characters of the reply handed out so far


def _single(spec: dict) -> bool:
    """Can this stack be one row of a PEFT mixed batch (the base, or one adapter at weight 1)?"""
    return not spec or (len(spec) == 1 and next(iter(spec.values())) == 1.0)


def _pad_left(x: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    if n == 0:
        return x
    shape = list(x.shape)
    shape[dim] = n
    return torch.cat([x.new_zeros(shape), x], dim=dim)


class HfDecoder(Decoder):
    def __init__(self, backend, capacity: int = 8, chunk: int | None = None):
        self.backend, self.capacity, self.chunk = backend, capacity, chunk or PREFILL_CHUNK
        self._rows: dict = {}
        self._waiting: list = []   # keys of rows still prefilling, oldest first
        self._order: list = []     # keys of the rows in the batch cache, by row
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None  # (rows, columns): 1 = a real token, 0 = left padding
        self._mode: tuple | None = None  # ("stack", spec) or ("mixed",)
        self._mixed = ExitStack()
        self._default, self._was_merged = backend.active_adapters, backend.merged
        self._eos = eos_ids(backend.model, backend.tokenizer)
        self._device = backend.device
        few_rows.install(backend.model)  # decode steps' few rows as W·xᵀ where this CPU does that faster

    @property
    def rows(self) -> dict:
        return self._rows

    # -- adapters --------------------------------------------------------------------------------------
    @property
    def _peft(self):
        stack = self.backend.adapters
        return stack.peft if stack is not None else None

    def can_join(self, adapters: dict) -> bool:
        if not self._rows or self._mode == ("stack", adapters):
            return True
        return _single(adapters) and (self._mode == ("mixed",) or _single(self._mode[1]))

    def _set_mode(self, spec: dict) -> None:
        if not self._rows:  # a fresh batch: any stack
            self._mixed.close()
            if spec == self.backend.active_adapters or not _single(spec) or self._peft is None:
                if self.backend.active_adapters != spec:
                    self.backend.set_adapters(spec)
                self._mode = ("stack", dict(spec))
                return
        elif self._mode == ("stack", spec) or self._mode == ("mixed",):
            return
        # one adapter per row from now on (the rows running keep theirs: they were single too)
        self._mixed.enter_context(self.backend.adapters.mixed(list(self.backend.adapters.loaded)))
        self._mode = ("mixed",)

    def close(self) -> None:
        """The UI's stack, merged or not, as it was before the batch."""
        self._mixed.close()
        restore_stack(self.backend, self._default, self._was_merged)

    # -- rows ------------------------------------------------------------------------------------------
    def add(self, key, ids: list[int], params: GenerationParams, adapters: dict) -> int:
        if not ids:
            raise BadInput("the prompt is empty")
        if not self.can_join(adapters):
            raise BadInput("this stack cannot join the running batch")  # the scheduler asks first
        loaded = self.backend.adapters.loaded if self.backend.adapters is not None else {}
        missing = [n for n in adapters if n not in loaded]
        if missing:
            raise BadInput(f"adapter(s) not loaded: {', '.join(missing)}")
        grammar = self.backend.grammar_processor(params.response_format) if params.response_format else None
        self._set_mode(adapters)
        name = peft_key(next(iter(adapters))) if adapters and _single(adapters) else "__base__"
        self._rows[key] = _Row(list(ids), len(ids), name, RowSampler(params, len(ids), grammar))
        self._waiting.append(key)
        return params.max_new_tokens

    def remove(self, key) -> None:
        self._rows.pop(key, None)
        if key in self._waiting:
            self._waiting.remove(key)
        if key not in self._order:
            return
        i = self._order.index(key)
        del self._order[i]
        if not self._order:
            self._cache = self._mask = None
            return
        keep = [j for j in range(self._mask.shape[0]) if j != i]
        self._cache.batch_select_indices(torch.tensor(keep, device=self._device))
        self._mask = self._mask[keep]
        used = self._mask.any(dim=0).nonzero()
        first = int(used[0]) if len(used) else 0
        if first:  # columns that were padding for every row left
            for layer in self._layers(self._cache):
                layer.keys, layer.values = layer.keys[..., first:, :], layer.values[..., first:, :]
            self._mask = self._mask[:, first:]

    @staticmethod
    def _layers(cache: DynamicCache):
        return [layer for layer in cache.layers if getattr(layer, "is_initialized", True) and layer.keys is not None]

    def _join(self, keys: list, cache: DynamicCache, mask: torch.Tensor) -> None:
        """Prefilled rows (their cache and mask, left-padded among themselves) into the batch's, both
        left-padded to the longer one."""
        if self._cache is None:
            self._cache, self._mask = cache, mask
        else:
            width = max(self._mask.shape[1], mask.shape[1])
            pad_batch, pad_rows = width - self._mask.shape[1], width - mask.shape[1]
            for mine, theirs in zip(self._layers(self._cache), self._layers(cache)):
                mine.keys = torch.cat([_pad_left(mine.keys, pad_batch, -2), _pad_left(theirs.keys, pad_rows, -2)])
                mine.values = torch.cat([_pad_left(mine.values, pad_batch, -2),
                                         _pad_left(theirs.values, pad_rows, -2)])
            self._mask = torch.cat([_pad_left(self._mask, pad_batch, 1), _pad_left(mask, pad_rows, 1)])
        for key in keys:
            self._rows[key].cache = None
        self._order += keys

    # -- stepping --------------------------------------------------------------------------------------
    def _forward(self, ids, mask, positions, cache, names: list[str]) -> torch.Tensor:
        kwargs = dict(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                      use_cache=True, logits_to_keep=1)
        if self._mode == ("mixed",):
            return self._peft(**kwargs, adapter_names=names).logits[:, -1]
        return self.backend.model(**kwargs).logits[:, -1]

    def _newcomers(self) -> list:
        """The rows to prefill in this step: the oldest newcomer's next chunk alone when its prompt is longer
        than a chunk, else every newcomer, in order, whose whole prompt fits in the chunk's budget together
        (left-padded to the longest: prompts that arrive together are read in one pass, as a static batch)."""
        first = self._rows[self._waiting[0]]
        if first.prefilled or first.prompt_len > self.chunk:
            return self._waiting[:1]
        keys, longest = [], 0
        for key in self._waiting:
            row = self._rows[key]
            longest = max(longest, row.prompt_len)
            if row.prefilled or longest * (len(keys) + 1) > self.chunk:
                break
            keys.append(key)
        return keys

    @torch.inference_mode()
    def step(self) -> list[tuple]:
        events = []
        if self._waiting:  # newcomers' prompts first: their first tokens come sooner
            keys = self._newcomers()
            rows = [self._rows[k] for k in keys]
            if len(rows) == 1:  # one prompt, maybe one chunk of a long one, into its own cache
                row = rows[0]
                piece = row.ids[row.prefilled:row.prefilled + self.chunk]
                start, end = row.prefilled, row.prefilled + len(piece)
                if row.cache is None:
                    row.cache = DynamicCache()
                ids = torch.tensor([piece], device=self._device)
                mask = torch.ones((1, end), dtype=torch.long, device=self._device)
                positions = torch.arange(start, end, device=self._device)[None]
                cache = row.cache
            else:  # whole short prompts together, left-padded
                width = max(r.prompt_len for r in rows)
                pad = self.backend.tokenizer.pad_token_id or 0
                ids = torch.tensor([[pad] * (width - r.prompt_len) + r.ids for r in rows], device=self._device)
                mask = torch.tensor([[0] * (width - r.prompt_len) + [1] * r.prompt_len for r in rows],
                                    device=self._device)
                positions = (mask.cumsum(1) - 1).clamp(min=0)
                cache = DynamicCache()
            logits = self._forward(ids, mask, positions, cache, [r.name for r in rows])
            for row in rows:
                row.prefilled += ids.shape[1] if len(rows) == 1 else row.prompt_len
            if all(r.prefilled == r.prompt_len for r in rows):  # they join the batch, and decode with it now
                del self._waiting[:len(keys)]
                self._join(keys, cache, mask)
                events += [self._emit(key, row.sampler.choose(row.ids, logits[i]))
                           for i, (key, row) in enumerate(zip(keys, rows))]
        if self._order:  # one token for every row in the batch
            rows = [self._rows[k] for k in self._order]
            ids = torch.tensor([[r.ids[-1]] for r in rows], device=self._device)
            positions = torch.tensor([[len(r.ids) - 1] for r in rows], device=self._device)
            self._mask = torch.cat([self._mask, self._mask.new_ones((len(rows), 1))], dim=1)
            with few_rows.rows_product():
                logits = self._forward(ids, self._mask, positions, self._cache, [r.name for r in rows])
            best = logits.argmax(-1).tolist() if any(r.sampler.plain_greedy for r in rows) else None
            for i, key in enumerate(list(self._order)):
                events.append(self._emit(key, best[i] if rows[i].sampler.plain_greedy else
                                         rows[i].sampler.choose(rows[i].ids, logits[i])))
        return events

    def _emit(self, key, token: int) -> tuple:
        row = self._rows[key]
        row.ids.append(token)
        if token in self._eos:
            return key, token, ""
        # the whole reply is decoded each time (as transformers' streamers do), so the pieces join to exactly
        # what decoding the reply at once gives; an incomplete UTF-8 character waits for its next byte
        text = self.backend.tokenizer.decode(row.ids[row.prompt_len:], skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return key, token, ""
        delta, row.shown = text[row.shown:], len(text)
        return key, token, delta

    def flush(self, key) -> str:
        row = self._rows[key]
        reply = [t for t in row.ids[row.prompt_len:] if t not in self._eos]
        return self.backend.tokenizer.decode(reply, skip_special_tokens=True)[row.shown:]

    def is_end(self, token: int) -> bool:
        return token in self._eos
