"""A decode step's Linear layers on CPU, written W·xᵀ where that is faster.

A continuous batch's decode step multiplies every weight matrix by a handful of rows (one token per request).
torch's nn.Linear computes x·Wᵀ through MKL's sgemm, and for 2–16 rows some CPUs run that form at about half the
speed of the same product written W·xᵀ: on this project's 2-core AMD EPYC, 4 rows through the 151 matrices of
SmolLM2-135M take 67 ms as x·Wᵀ and 36 ms as W·xᵀ, while one row (a matrix-vector product) takes 50 ms either
way, so a batch of 4 cost 1.5 single steps instead of ~1. Which form is faster is measured once per model on its
own largest matrix (`install`), so a CPU where MKL's small-row path is fine keeps nn.Linear's.

The two forms are the same product; the sums are blocked differently, so the last bits of a row may differ, as they
already do between one row (a matrix-vector product) and several. It is used only inside `rows_product()` — the
continuous batch's decode steps — on float32 CPU weights without autograd; everywhere else the layers compute
exactly as nn.Linear (`F.linear(x, weight, bias)`).
"""
from __future__ import annotations

import threading
import time
import weakref
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

FEW = range(2, 17)  # row counts this applies to
_state = threading.local()
_decided: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> whether it has the W·xᵀ form


class FewRowsLinear(nn.Linear):
    """nn.Linear, with the product written W·xᵀ for a few float32 CPU rows inside `rows_product()`."""

    def forward(self, x):
        if getattr(_state, "on", False) and x.dtype == torch.float32 and x.device.type == "cpu" \
                and not torch.is_grad_enabled():
            rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
            if rows in FEW:
                # laid out as F.linear's output (row-major): in-place users such as a grammar's token mask need it
                out = torch.matmul(self.weight, x.reshape(rows, x.shape[-1]).T).T.contiguous()
                if self.bias is not None:
                    out = out + self.bias
                return out.reshape(*x.shape[:-1], self.out_features)
        return F.linear(x, self.weight, self.bias)


@contextmanager
def rows_product():
    """Inside: the installed layers of this thread's forward passes use W·xᵀ for a few rows."""
    before = getattr(_state, "on", False)
    _state.on = True
    try:
        yield
    finally:
        _state.on = before


def _faster_transposed(weight: torch.Tensor, rows: int = 4, reps: int = 5) -> bool:
    """Whether W·xᵀ beats F.linear on this weight for `rows` rows (best of `reps`, by a clear margin)."""
    # its own generator: a seeded generation in another thread keeps the global one's sequence
    x = torch.randn(rows, weight.shape[1], dtype=weight.dtype, generator=torch.Generator().manual_seed(0))

    def best(fn) -> float:
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    with torch.inference_mode():
        plain = best(lambda: F.linear(x, weight))
        transposed = best(lambda: torch.matmul(weight, x.T).T)
    return transposed < 0.8 * plain


def install(model) -> bool:
    """Give the plain nn.Linear layers of a float32 CPU `model` (not LoRA's own A and B, which the quick LoRA
    forward wants as they are) the W·xᵀ form, if this CPU computes it faster. Measured once per model; a layer
    added later (a new adapter's base layer is an installed one already) keeps nn.Linear. Returns the choice."""
    if model in _decided:
        return _decided[model]
    linears = [m for name, m in model.named_modules()
               if type(m) in (nn.Linear, FewRowsLinear) and ".lora_" not in f".{name}"]
    weight = max((m.weight for m in linears), key=lambda w: w.numel(), default=None)
    chosen = (weight is not None and weight.device.type == "cpu" and weight.dtype == torch.float32
              and (any(type(m) is FewRowsLinear for m in linears) or _faster_transposed(weight.detach())))
    if chosen:
        for m in linears:
            m.__class__ = FewRowsLinear
    _decided[model] = chosen
    return chosen
