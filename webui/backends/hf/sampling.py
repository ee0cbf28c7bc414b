"""Per-request token choice for the transformers-family loaders: the logits processors and warpers a
GenerationParams asks for, built from transformers' own classes, and one request's next token from its row
of logits. `model.generate` applies one set of settings to a whole batch; the continuous batch
(webui/backends/hf/continuous.py) gives every row its own, so it calls these per row.
"""
from __future__ import annotations

import random

import torch
from transformers import (
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from webui.options.config import GenerationParams


class PresenceFrequencyPenalty:
    """OpenAI-style presence/frequency penalties, which transformers' generate lacks (it only has the
    multiplicative repetition_penalty): subtract presence + frequency * count for each token generated
    so far (not the prompt, as in the OpenAI definition)."""

    def __init__(self, presence: float, frequency: float, prompt_len: int):
        self.presence, self.frequency, self.prompt_len = presence, frequency, prompt_len

    def __call__(self, input_ids, scores):
        generated = input_ids[:, self.prompt_len:]
        if generated.shape[1] == 0:
            return scores
        counts = torch.zeros_like(scores)
        counts.scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
        return scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)


class RowSampler:
    """One request's token choice: its processors (penalties, then the grammar of a response format), then
    for sampling the warpers in generate's order and a draw from its own generator (the request's seed, so
    a seeded request samples the same whatever else is in the batch)."""

    def __init__(self, params: GenerationParams, prompt_len: int, grammar=None):
        self.greedy = params.greedy
        processors = LogitsProcessorList()
        if params.repetition_penalty != 1.0:
            processors.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
        if params.presence_penalty or params.frequency_penalty:
            processors.append(PresenceFrequencyPenalty(params.presence_penalty, params.frequency_penalty, prompt_len))
        if grammar is not None:
            processors.append(grammar)
        if not self.greedy:
            # float(): transformers refuses an int, and a whole number typed in the UI (1) arrives as one
            processors.append(TemperatureLogitsWarper(float(params.temperature)))
            if params.top_k:
                processors.append(TopKLogitsWarper(params.top_k))
            if params.top_p < 1.0:
                processors.append(TopPLogitsWarper(params.top_p))
            if params.min_p:
                processors.append(MinPLogitsWarper(params.min_p))
            if params.typical_p < 1.0:
                processors.append(TypicalLogitsWarper(params.typical_p))
        self.processors = processors
        self.generator = None
        if not self.greedy:
            self.generator = torch.Generator().manual_seed(params.seed if params.seed >= 0 else random.randrange(2**31))

    @property
    def plain_greedy(self) -> bool:
        """Greedy with nothing to apply: the batch's argmax is this row's token."""
        return self.greedy and not self.processors

    def choose(self, ids: list[int], logits: torch.Tensor) -> int:
        """The next token after `ids` (prompt and reply so far) from this row's logits (vocabulary,)."""
        scores = logits[None].float()
        if self.processors:
            scores = self.processors(torch.tensor([ids], device=logits.device), scores)
        if self.greedy:
            return int(scores.argmax(-1))
        probs = torch.softmax(scores, dim=-1).cpu()  # the generator lives on the CPU
        return int(torch.multinomial(probs[0], 1, generator=self.generator))
