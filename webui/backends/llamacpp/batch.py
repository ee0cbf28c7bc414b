"""Continuous batching for the llama.cpp loader: a `Decoder` (webui/backends/base.py) over llama.cpp's batch API,
as llama-server serves its slots. Several requests share one llama.cpp context of its own (created once from
the loaded model, kept until the model is unloaded; the `Llama` object's context stays for the single-request
path and scoring), each in its own sequence of the KV cache:

- each step is one `llama_decode` of one `llama_batch`: the next token of every running row, plus a chunk of
  the prompt of each row still prefilling (a long prompt goes in pieces of `busy_chunk` tokens while other rows
  are generating, so they are not stalled for long; in pieces of n_batch when nothing else runs); a short
  prompt that arrives while others generate gets a step of its own first (prefill first, as SGLang schedules),
  the generating rows never skipping two steps in a row;
- every row has its own sampler: llama.cpp's sampler chain built as llama-cpp-python builds it for
  `Llama.generate` (penalties, the response-format grammar, then greedy at temperature 0, else top-k,
  typical, top-p, min-p, temperature and a distribution seeded with the row's seed), so a row gives the tokens
  the single-request path (`LlamaCppBackend.stream_tokens`) gives for the same prompt;
- llama.cpp applies LoRA adapters per context, so rows run together only with the same adapter stack
  (`can_join`); the stack is set on this context when the first row of a batch joins, never on the UI's;
- the KV cache is kept per slot after a row leaves (llama-server's prompt cache): a new row whose prompt starts
  with a free slot's tokens, computed with the same adapter stack, reuses them and decodes only the rest (the
  next turn of a chat decodes only the new message).

Context: llama-server divides `-c` among its `-np` slots (unless --kv-unified). Here every sequence gets the
whole context the model was loaded with (`n_ctx`), the same limit as the single-request path, so a request
that runs alone also runs in a batch. The sequences share one pool of `capacity` x n_ctx cells (kv_unified, as
`llama-server --kv-unified`): measured here, 4 rows decode 1.2-1.3x faster than with one KV stream per
sequence (0.80-0.87 of llama-server against 0.68-0.70). Every row fits (each is at most n_ctx), but kept
prompt caches of free slots take cells too: when llama.cpp finds no room for a step, those caches are dropped
and the step is tried again. The cost is memory: `capacity` x n_ctx cells, so the capacity is as
many rows (8 at most) as fit in KV_BUDGET bytes. Where fewer than two fit (a big model at a long context) the
loader makes no decoder: one row would be the model's own context again at twice the KV memory, so requests
run one after another on that context (the scheduler's static path), and a smaller n_ctx buys rows.
"""
from __future__ import annotations

import codecs
import ctypes
import random
from dataclasses import dataclass, field

from webui.backends.base import Decoder
from webui.errors import BadInput
from webui.options.config import GenerationParams

KV_BUDGET = 1 << 30  # bytes of KV cache the decoder may take (beyond the loaded context's own) for its rows
MIN_REUSE = 16       # a cached prefix shorter than this is not worth keeping a slot's cache for


def _lc():
    import llama_cpp
    return llama_cpp


@dataclass
class _Slot:
    seq: int
    tokens: list = field(default_factory=list)  # what this sequence's KV cache holds, position by position
    stack: tuple = ()                           # the adapter stack it was computed with
    key: object = None                          # the row using it, or None (free, cache kept)
    used: int = 0                               # when it was last taken (least recently used goes first)


@dataclass
class _Row:
    key: object
    slot: _Slot
    pending: list            # prompt tokens still to decode
    sampler: object          # llama_sampler_p (a chain)
    budget: int
    utf8: object
    next: int | None = None  # the last sampled token, decoded on the next step
    logits_at: int = -1      # its index in the current batch, when this step samples for it
    generated: int = 0
    started: bool = False    # a piece of its prompt has been decoded


def rows_that_fit(llm) -> int:
    """How many rows of the whole context (n_ctx each) fit in KV_BUDGET bytes of f16 K and V, 8 at most."""
    lc, model = _lc(), llm.model
    n_embd, n_head = lc.llama_model_n_embd(model), max(1, lc.llama_model_n_head(model))
    per_token = lc.llama_model_n_layer(model) * 2 * lc.llama_model_n_head_kv(model) * (n_embd // n_head) * 2
    return min(8, KV_BUDGET // max(1, llm.n_ctx() * per_token))


class LlamaCppDecoder(Decoder):
    busy_chunk = 128  # prompt tokens per step for a row prefilling while others generate

    def __init__(self, backend, capacity: int | None = None):
        lc = _lc()
        self.backend = backend
        llm = backend.llm
        self.model, self.vocab = llm.model, llm._model.vocab
        per_seq = llm.n_ctx()
        self.capacity = capacity = capacity or max(1, rows_that_fit(llm))
        params = lc.llama_context_params()
        ctypes.memmove(ctypes.byref(params), ctypes.byref(llm.context_params), ctypes.sizeof(params))
        params.n_seq_max = capacity
        params.n_ctx = per_seq * capacity
        params.kv_unified = True
        params.n_batch = params.n_ubatch = llm.n_batch
        params.embeddings = False
        params.no_perf = True
        self.ctx = lc.llama_init_from_model(self.model, params)
        if not self.ctx:
            raise BadInput(f"llama.cpp could not create a context of {capacity} x {per_seq} tokens for batching")
        self.n_batch = llm.n_batch
        self.n_ctx_seq = min(per_seq, int(lc.llama_n_ctx_seq(self.ctx)))
        self.memory = lc.llama_get_memory(self.ctx)
        self.batch = lc.llama_batch_init(self.n_batch, 0, 1)
        self.slots = [_Slot(seq) for seq in range(capacity)]
        self._rows: dict = {}
        self._stack: tuple = ()       # the adapter stack set on this context
        self._skipped = False         # the last step was prompts alone (the generating rows waited)
        self._clock = 0

    # -- the Decoder contract --------------------------------------------------------------------
    @property
    def rows(self) -> dict:
        return self._rows

    def _stack_key(self, adapters: dict) -> tuple:
        """The stack as this context applies it: names, weights and the adapter objects (an adapter loaded again
        from changed files is another object, so no cache computed with the old one is reused)."""
        missing = [n for n in adapters if n not in self.backend._adapters]
        if missing:
            raise BadInput(f"adapter(s) not loaded: {', '.join(missing)}")
        return tuple((n, float(w), ctypes.cast(self.backend._adapters[n][0], ctypes.c_void_p).value)
                     for n, w in sorted(adapters.items()))

    def can_join(self, adapters: dict) -> bool:
        if not self._rows:
            return True
        try:
            return self._stack_key(adapters) == self._stack
        except BadInput:
            return False  # add() says why

    def _set_stack(self, adapters: dict, key: tuple) -> None:
        lc = _lc()
        if key == self._stack:
            return
        names = sorted(adapters)
        n = len(names)
        pointers = (lc.llama_adapter_lora_p_ctypes * n)(*(self.backend._adapters[k][0] for k in names)) if n else None
        scales = (ctypes.c_float * n)(*(float(adapters[k]) for k in names)) if n else None
        if lc.llama_set_adapters_lora(self.ctx, pointers, n, scales) != 0:
            raise BadInput(f"llama.cpp could not activate {', '.join(names)}")
        self._stack = key

    def _sampler(self, params: GenerationParams):
        """llama.cpp's sampler chain, built as llama-cpp-python's Llama._init_sampler builds it for generate()."""
        lc = _lc()
        grammar = self.backend.prepare_response_format(params.response_format)  # may refuse the schema
        chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
        add = lambda s: lc.llama_sampler_chain_add(chain, s)
        add(lc.llama_sampler_init_penalties(self.backend.llm.n_vocab(), self.backend.llm.last_n_tokens_size,
                                            params.repetition_penalty, params.frequency_penalty,
                                            params.presence_penalty))
        if grammar is not None:
            add(lc.llama_sampler_init_grammar(self.vocab, grammar._grammar.encode("utf-8"),
                                              grammar._root.encode("utf-8")))
        if params.greedy:
            add(lc.llama_sampler_init_greedy())
        else:
            seed = params.seed if params.seed >= 0 else random.randrange(2**31)
            add(lc.llama_sampler_init_top_k(params.top_k))
            add(lc.llama_sampler_init_typical(params.typical_p, 1))
            add(lc.llama_sampler_init_top_p(params.top_p, 1))
            add(lc.llama_sampler_init_min_p(params.min_p, 1))
            add(lc.llama_sampler_init_temp(params.temperature))
            add(lc.llama_sampler_init_dist(seed))
        return chain

    def _pick_slot(self, ids: list[int], stack: tuple) -> tuple[_Slot, int]:
        """A free slot and how many of its cached tokens the prompt reuses: the longest shared prefix among the
        slots computed with this stack, else the least recently used slot (an empty one first)."""
        free = [s for s in self.slots if s.key is None]
        best, reuse = None, 0
        for s in free:
            if s.stack != stack or not s.tokens:
                continue
            n = 0
            for a, b in zip(s.tokens, ids):
                if a != b:
                    break
                n += 1
            if n > reuse:
                best, reuse = s, n
        if best is None or reuse < min(MIN_REUSE, len(ids) - 1):
            best, reuse = min(free, key=lambda s: (bool(s.tokens), s.used)), 0
        return best, min(reuse, len(ids) - 1)  # at least the last prompt token is decoded: its logits

    def add(self, key, ids: list[int], params: GenerationParams, adapters: dict) -> int:
        lc = _lc()
        if key in self._rows:
            raise ValueError(f"row {key!r} is already running")
        if len(self._rows) >= self.capacity:
            raise BadInput(f"the batch is full ({self.capacity} rows)")
        if not ids:
            raise BadInput("the prompt is empty")
        budget = min(params.max_new_tokens, self.n_ctx_seq - len(ids))
        if budget <= 0:
            raise BadInput(f"the prompt has {len(ids)} tokens; the context holds {self.n_ctx_seq}")
        stack = self._stack_key(adapters)
        if self._rows and stack != self._stack:
            raise BadInput("a row with another adapter stack cannot join this batch (see can_join)")
        self._set_stack(adapters, stack)
        sampler = self._sampler(params)
        slot, reuse = self._pick_slot(ids, stack)
        lc.llama_memory_seq_rm(self.memory, slot.seq, reuse if reuse else -1, -1)
        del slot.tokens[reuse:]
        self._clock += 1
        slot.key, slot.stack, slot.used = key, stack, self._clock
        self._rows[key] = _Row(key, slot, list(ids[reuse:]), sampler, budget,
                               codecs.getincrementaldecoder("utf-8")(errors="replace"))
        return budget

    def step(self) -> list[tuple]:
        lc = _lc()
        batch, n = self.batch, 0
        busy = any(r.next is not None for r in self._rows.values())

        def put(token: int, row: _Row, logits: bool) -> None:
            nonlocal n
            batch.token[n] = token
            batch.pos[n] = len(row.slot.tokens)
            batch.n_seq_id[n] = 1
            batch.seq_id[n][0] = row.slot.seq
            batch.logits[n] = logits
            row.slot.tokens.append(token)
            if logits:
                row.logits_at = n
            n += 1

        sampling, before = [], {key: len(row.slot.tokens) for key, row in self._rows.items()}
        # Prefill first (SGLang's default policy): newcomers whose whole prompts fit in one chunk get a step of
        # their prompts alone, so their first tokens do not wait for the generating rows' tokens too; those skip this
        # one step, and never two in a row (the next step always carries their tokens)
        newcomers = [r for r in self._rows.values()
                     if r.pending and not r.started and len(r.pending) <= self.busy_chunk]
        prefill_only = busy and not self._skipped and bool(newcomers)
        self._skipped = prefill_only
        for row in self._rows.values():  # every generating row's next token first
            if row.next is not None and not prefill_only:
                put(row.next, row, True)
                row.next = None
                sampling.append(row)
        # then prompt chunks, in order of arrival, as far as the batch holds (in a prefill-first step: those prompts)
        for row in newcomers if prefill_only else self._rows.values():
            if not row.pending or n >= self.n_batch:
                continue
            row.started = True
            room = min(self.n_batch - n, self.busy_chunk if busy else self.n_batch)
            chunk, row.pending = row.pending[:room], row.pending[room:]
            for i, token in enumerate(chunk):
                put(token, row, not row.pending and i == len(chunk) - 1)
            if not row.pending:
                sampling.append(row)
            busy = True
        if not n:
            return []
        batch.n_tokens = n
        status = lc.llama_decode(self.ctx, batch)
        if status == 1 and self._drop_kept_caches():  # no room (llama.cpp restored its memory): free some, again
            status = lc.llama_decode(self.ctx, batch)
        if status != 0:  # nothing of this step is kept: the rows' caches end where they ended before it
            for key, row in self._rows.items():
                lc.llama_memory_seq_rm(self.memory, row.slot.seq, before[key], -1)
                del row.slot.tokens[before[key]:]
            raise RuntimeError(f"llama.cpp could not decode the batch (llama_decode returned {status})")
        out = []
        for row in sampling:
            token = int(lc.llama_sampler_sample(row.sampler, self.ctx, row.logits_at))  # (also accepts it)
            row.generated += 1
            if lc.llama_vocab_is_eog(self.vocab, token):
                out.append((row.key, token, ""))
            else:
                out.append((row.key, token, row.utf8.decode(self.backend.llm.detokenize([token]))))
            row.next = token
        return out

    def _drop_kept_caches(self) -> bool:
        """Free the cells of the prompt caches that free slots keep; False when there were none."""
        kept = [s for s in self.slots if s.key is None and s.tokens]
        for s in kept:
            _lc().llama_memory_seq_rm(self.memory, s.seq, -1, -1)
            s.tokens, s.stack = [], ()
        return bool(kept)

    def is_end(self, token: int) -> bool:
        return bool(_lc().llama_vocab_is_eog(self.vocab, token))

    def flush(self, key) -> str:
        row = self._rows.get(key)
        return row.utf8.decode(b"", final=True) if row is not None else ""

    def remove(self, key) -> None:
        row = self._rows.pop(key, None)
        if row is None:
            return
        _lc().llama_sampler_free(row.sampler)
        row.slot.key = None  # its cache (a valid prefix even when cancelled mid-prompt) stays for a later prompt

    def close(self) -> None:
        """Nothing of the UI's to restore (the adapters are set on this context only); the caches stay. Rows
        still here (a batch abandoned after an error) are dropped, so their slots serve the next batch."""
        for key in list(self._rows):
            self.remove(key)

    # -- the backend's housekeeping ----------------------------------------------------------------
    def forget_adapter(self, name: str) -> None:
        """An adapter is about to be freed: take it off this context and drop the caches computed with it."""
        lc = _lc()
        if any(n == name for n, *_ in self._stack):
            lc.llama_set_adapters_lora(self.ctx, None, 0, None)
            self._stack = ()
        for s in self.slots:
            if s.key is None and any(n == name for n, *_ in s.stack):
                lc.llama_memory_seq_rm(self.memory, s.seq, -1, -1)
                s.tokens, s.stack = [], ()

    def free(self) -> None:
        lc = _lc()
        for key in list(self._rows):
            self.remove(key)
        if self.ctx:
            lc.llama_batch_free(self.batch)
            lc.llama_free(self.ctx)
            self.ctx = None
