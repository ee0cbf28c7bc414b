"""Shared pieces of the benchmarks: side-by-side timing (alternating ours and the reference, several
repetitions, the median) and the result rows of INTERFACES.md."""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable


@dataclass
class Row:
    name: str
    ours: float
    reference: float
    unit: str
    higher_is_better: bool
    note: str = ""

    @property
    def ratio(self) -> float:
        return self.ours / self.reference if self.reference else float("nan")

    def to_dict(self) -> dict:
        return {**asdict(self), "ratio": self.ratio}


def side_by_side(ours: Callable[[], float], reference: Callable[[], float], reps: int) -> tuple[float, float]:
    """Alternate the two measurements `reps` times; each callable returns its own figure. Medians."""
    a, b = [], []
    for i in range(reps):
        # alternate which goes first, so warm-up and drift hit both sides alike
        if i % 2 == 0:
            a.append(ours())
            b.append(reference())
        else:
            b.append(reference())
            a.append(ours())
    return statistics.median(a), statistics.median(b)


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start
