"""The numbers of an evaluation. A sample's loss is the mean negative log-likelihood of its trained tokens
(those whose training label is not -100), exactly what training minimizes; a configuration's loss is the
mean over all trained tokens of all samples (so long samples weigh more, as in training), and its
perplexity is exp(loss). The difference to the base comes with a paired bootstrap 95% interval: samples are
drawn with replacement (the same draw for both), the difference recomputed, and the 2.5th and 97.5th
percentiles kept; a fixed seed makes the interval reproducible.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from webui.training.data import IGNORE


@dataclass
class SampleNll:
    """One sample under one configuration: the summed NLL of its trained tokens and how many there are."""

    total: float
    tokens: int

    @property
    def loss(self) -> float | None:
        return self.total / self.tokens if self.tokens else None


def sample_nll(labels: list[int], logprobs: list[float]) -> SampleNll:
    """labels[j] belongs to input token j, and logprobs[i] scores token i + 1 (the first token has no
    context), so trained token j (j >= 1) costs -logprobs[j - 1]. A trained first token cannot be scored; it
    carries no loss in training either (the causal shift drops it)."""
    picked = [-logprobs[j - 1] for j in range(1, len(labels)) if labels[j] != IGNORE]
    return SampleNll(float(sum(picked)), len(picked))


def mean_loss(samples: list[SampleNll]) -> float:
    tokens = sum(s.tokens for s in samples)
    return sum(s.total for s in samples) / tokens if tokens else float("nan")


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else float("inf")  # exp overflows a float past ~709


def paired_bootstrap(base: list[SampleNll], other: list[SampleNll], resamples: int = 1000,
                     seed: int = 0) -> tuple[float, float]:
    """95% interval of mean_loss(other) - mean_loss(base) over resamples of the samples (paired: one draw of
    sample indices serves both)."""
    counts = np.array([s.tokens for s in base], dtype=np.float64)
    a = np.array([s.total for s in base], dtype=np.float64)
    b = np.array([s.total for s in other], dtype=np.float64)
    rng = np.random.default_rng(seed)
    diffs = np.empty(resamples)
    for k in range(resamples):  # a loop, not one index matrix: resamples x samples could be large
        idx = rng.integers(0, len(counts), len(counts))
        n = counts[idx].sum()
        diffs[k] = (b[idx].sum() - a[idx].sum()) / n if n else 0.0
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return float(lo), float(hi)


def preference_margins(chosen: list[SampleNll], rejected: list[SampleNll], resamples: int = 1000,
                       seed: int = 0) -> tuple[float, float, tuple[float, float]]:
    """Over pairs: the mean margin (the chosen reply's summed log-probability minus the rejected one's, the quantity
    DPO's reward is built on), the share of pairs whose margin is above 0 (the win rate), and the bootstrap 95%
    interval of the mean margin."""
    margins = np.array([r.total - c.total for c, r in zip(chosen, rejected)], dtype=np.float64)  # totals are NLLs
    rng = np.random.default_rng(seed)
    means = [margins[rng.integers(0, len(margins), len(margins))].mean() for _ in range(resamples)]
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(margins.mean()), float((margins > 0).mean()), (float(lo), float(hi))


def verdict(ci: tuple[float, float]) -> str:
    """How to read a difference: lower loss is better; an interval that contains 0 says 'no clear difference'."""
    if ci[1] < 0:
        return "better than base"
    if ci[0] > 0:
        return "worse than base"
    return "no clear difference"
