"""Shared pieces of the benchmarks: side-by-side timing (alternating ours and the reference, several
repetitions, the median) and the result rows of INTERFACES.md."""
from __future__ import annotations

import os
import statistics
import subprocess
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent


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


def hot_swap_vs_reload(engine, models_dir, loras_dir, spec, reps: int) -> tuple[float, float]:
    """Median seconds to switch `engine` between its cached adapters A and B, and to reload the base
    (on a second Engine, so `engine` keeps its adapter cache), measured side by side."""
    from webui.engine import Engine

    reloader = Engine(models_dir, loras_dir)
    names = iter(["A", "B"] * reps * 2)

    def swap():
        name = next(names)
        return timed(lambda: engine.set_adapters({name: 1.0}))

    try:
        return side_by_side(swap, lambda: timed(lambda: reloader.load(spec)), reps)
    finally:
        reloader.unload()


def write_ab_adapters(base, loras) -> None:
    """Adapters A and B (r=16 on the attention projections) for the folder `base`, written once into
    `loras`: what the per-loader adapter benchmarks switch between."""
    from pathlib import Path

    from webui.testing.tiny_models import write_adapter

    for i, name in enumerate(("A", "B")):
        if not (Path(loras) / name).is_dir():
            write_adapter(base, Path(loras) / name, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                          r=16, alpha=16, seed=i)


def posted_tokens(url: str, route: str, body: dict) -> int:
    """Completion tokens of one non-streamed OpenAI-style request (`route`: /v1/completions or
    /v1/chat/completions)."""
    import httpx  # the HTTP benchmarks' client; the others never need it

    r = httpx.post(url + route, json=body, timeout=600)
    r.raise_for_status()
    return r.json()["usage"]["completion_tokens"]


def together(url: str, route: str, bodies: list[dict]) -> float:
    """Generated tokens/s of `bodies` sent at once, one thread each."""
    counts = [0] * len(bodies)

    def one(i: int) -> None:
        counts[i] = posted_tokens(url, route, bodies[i])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(bodies))]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / (time.perf_counter() - start)


def child_peak_rss(cmd: list[str]) -> tuple[str, float]:
    """(stdout, peak RSS in MB) of a child process run from the repository root; raises if it fails."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status):
        raise RuntimeError(f"{' '.join(cmd[:5])} failed with {os.waitstatus_to_exitcode(status)}")
    return out, usage.ru_maxrss / 1024
