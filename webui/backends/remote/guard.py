"""The silent no-op guard: after an adapter is registered with a serving engine, one-token probes check that the
engine really applies it, and that the plain base is still answered as the plain base.

Engines fail here without an error. vLLM's CPU build (0.32.0) indexes base-model tokens with -1, the last
adapter slot: once every `--max-loras` slot holds an adapter, a base request batched with adapter requests is
answered with the last slot's adapter (vllm PR #48421; users report the same symptom against GPU builds,
vllm#34186, #55193). An engine can also load an adapter and apply nothing of it (modules it does not patch, a
path that resolved to another folder). Both look like normal answers.

The probe is the top-5 log-probabilities of the first reply token to a fixed chat, greedy (Dialect.probe). The
base is probed alone when the engine is connected (the reference). After a registration the base (twice) and
every registered adapter are probed at once, so the engine batches them as it batches users' requests, and:
- the new adapter's probe equal to the reference: it changes nothing → refused;
- a base probe away from the reference: the engine applied an adapter to a base request → refused and taken off
  the engine's list. On vLLM that does not free the slot (only a restart does), so the error says to restart it.
Engines without log-probabilities (some OpenAI-compatible servers) are not checked; the status says so.
"""
from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor

from webui.errors import Incompatible

NOOP = 1e-3      # an adapter whose probe is this close to the base's changed nothing (float32 batching noise: ~1e-5)
CHANGED = 2e-2   # a base probe this far from the base alone came back with an adapter applied
ADAPTER_TOKENS = 16             # the adapters' probes run this long (only their first token is compared)
BASE_DELAYS = (0.0, 0.03, 0.1)  # seconds after the adapters' probes that the base is probed


def distance(a: list[tuple[str, float]], b: list[tuple[str, float]]) -> float:
    """How far apart two probes are: the largest log-probability difference over the tokens both list (tokens
    may repeat as text: byte pieces), infinite when the most likely token differs."""
    if not a or not b or a[0][0] != b[0][0]:
        return math.inf
    da, db = dict(a), dict(b)
    return max(abs(da[t] - db[t]) for t in da.keys() & db.keys())


def reference(dialect) -> list | None:
    """The base probed alone, or None when the engine gives no log-probabilities (then nothing is checked)."""
    try:
        return dialect.probe({})
    except Exception:  # noqa: BLE001 - an engine without logprobs is served unchecked, not refused
        return None


def check(dialect, name: str, base_probe: list | None, others: list[str]) -> None:
    """Probe `name` beside the base and `others` (the other adapters the engine holds) at once; raise Incompatible
    naming the engine and the adapter when the adapter changes nothing or the base came back changed."""
    if base_probe is None:
        return
    adapters = [name, *(o for o in others if o != name)]
    with ThreadPoolExecutor(len(adapters) + len(BASE_DELAYS), thread_name_prefix="probe") as pool:
        # the adapters' rows decode a few tokens, so the base rows sent just after them join a running batch (an
        # engine batches what is waiting at each step; one-token requests sent together may miss each other)
        tried = [pool.submit(dialect.probe, {a: 1.0}, ADAPTER_TOKENS) for a in adapters]
        bases = [pool.submit(_later, delay, dialect.probe, {}) for delay in BASE_DELAYS]
        probes, base_probes = [f.result() for f in tried], [f.result() for f in bases]
    engine = f"the {dialect.name} engine at {dialect.http.url}"
    if any(p is not None and distance(p, base_probe) > CHANGED for p in base_probes):
        raise Incompatible(
            f"{engine} answered a request for the plain base with an adapter applied once {name!r} was registered, "
            "so it is not served. vLLM's CPU build does this once every --max-loras slot holds an adapter (base rows "
            "take the last slot) and keeps doing it until it restarts: restart it with --max-loras above the number "
            "of adapters in use", code="engine_applies_adapter_to_base")
    if probes[0] is not None and distance(probes[0], base_probe) < NOOP:
        raise Incompatible(
            f"{engine} answers adapter {name!r} exactly as the plain base: the adapter changes nothing there (the "
            "engine may not patch the modules it targets, or its path led to other files; an untrained adapter "
            "with B = 0 also does this), so it is not served", code="adapter_changes_nothing")


def _later(delay: float, fn, *args):
    time.sleep(delay)
    return fn(*args)
