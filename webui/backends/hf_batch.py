"""Batched, streamed generation for transformers-family models (float and GPTQ): several prompts in one
`generate` call, left-padded, each row optionally with its own LoRA adapter (PEFT's mixed-batch
`adapter_names`). transformers' TextIteratorStreamer handles batch size 1 only, so `RowStreamer` is the
small piece on top: it splits each step's tokens by row and detokenizes every row incrementally.

Events yielded by `stream_batch`: ("delta", row, text) and, once per row, ("done", row, finish_reason,
completion_tokens, token_ids) with finish_reason "stop" (end of sequence) or "length" (max_new_tokens
reached); token_ids are the generated ids, ending with the end-of-sequence token the row stopped on.
"""
from __future__ import annotations

import queue
import threading
from typing import Iterator

import torch
from transformers.generation.streamers import BaseStreamer


class RowStreamer(BaseStreamer):
    def __init__(self, tokenizer, rows: int, eos_ids: set[int], events: queue.Queue):
        self.tokenizer, self.eos_ids, self.events = tokenizer, eos_ids, events
        self.tokens: list[list[int]] = [[] for _ in range(rows)]
        self.shown = [0] * rows
        self.done = [False] * rows
        self.prompt_seen = False

    def put(self, value):
        if not self.prompt_seen:  # generate() first hands over the prompt ids
            self.prompt_seen = True
            return
        for row, token in enumerate(value.reshape(-1).tolist()):
            if self.done[row]:
                continue
            if token in self.eos_ids:
                self._finish(row, "stop", eos=token)
                continue
            self.tokens[row].append(token)
            self._emit(row, final=False)

    def _emit(self, row: int, final: bool) -> None:
        text = self.tokenizer.decode(self.tokens[row], skip_special_tokens=True)
        if not final and text.endswith("\ufffd"):
            return  # an incomplete UTF-8 character: wait for its next byte
        delta = text[self.shown[row]:]
        self.shown[row] = len(text)
        if delta:
            self.events.put(("delta", row, delta))

    def _finish(self, row: int, reason: str, eos: int | None = None) -> None:
        self._emit(row, final=True)
        self.done[row] = True
        ids = self.tokens[row] + ([eos] if eos is not None else [])
        self.events.put(("done", row, reason, len(self.tokens[row]), ids))

    def end(self):
        for row in range(len(self.done)):
            if not self.done[row]:
                self._finish(row, "length")


def eos_ids(model, tokenizer) -> set[int]:
    ids = model.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, (list, tuple)) else [ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def stream_batch(model, tokenizer, inputs: dict, generate_kwargs: dict, generate_fn=None,
                 cancel: threading.Event | None = None) -> Iterator[tuple]:
    """Run `generate_fn(**inputs, **generate_kwargs, streamer=...)` on a worker thread and yield row
    events. `inputs` is the left-padded batch; closing the iterator cancels the generation (through the
    stopping criteria the caller put in generate_kwargs around `cancel`)."""
    cancel = cancel or threading.Event()
    events: queue.Queue = queue.Queue()
    streamer = RowStreamer(tokenizer, inputs["input_ids"].shape[0], eos_ids(model, tokenizer), events)
    generate_fn = generate_fn or model.generate
    failure: list[BaseException] = []
    finished = object()

    def work():
        try:
            with torch.inference_mode():
                generate_fn(**inputs, **generate_kwargs, streamer=streamer)
        except BaseException as e:  # handed to the consumer below
            failure.append(e)
        finally:
            events.put(finished)

    worker = threading.Thread(target=work, name="generate-batch", daemon=True)
    worker.start()
    try:
        while True:
            event = events.get()
            if event is finished:
                break
            yield event
    finally:
        cancel.set()
        worker.join()
    if failure:
        raise failure[0]
