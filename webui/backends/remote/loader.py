"""The remote loader: a serving engine on another machine (vLLM, SGLang, LoRAX, llama.cpp's llama-server, another
LoRA Deck, any OpenAI-compatible server) driven over HTTP as if it were a loaded model, so the Chat tab, the
LoRA panel and the API work the same whether the model runs here or on a GPU server.

`--loader remote --model http://HOST:PORT` (or any http(s) URL with `--loader auto`). The engine batches:
the scheduler hands every request over at once (`Capabilities.concurrent`), each with its own adapter
stack, and `stream_batch` runs its rows in threads, one HTTP stream each. Adapters are the engine's, in its
own terms (webui/backends/remote/engines/__init__.py). What an engine cannot do — merge into its base, train on it,
score tokens — is refused with the reason. An engine that is down, slow or broke off gives EngineUnavailable
(503/502); the next request tries again, and after a failure the engine's adapter state is read again (a
restarted engine has forgotten runtime registrations). An engine that serves one adapter per request (vLLM,
SGLang) gets a weighted stack as one adapter: the stack blended exactly from the files (webui/adapters/
file_blend.py, PEFT's `cat`), written once into the adapters folder as `.stack-<digest>` and registered.
"""
from __future__ import annotations

import hashlib
import json
import queue
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from webui.adapters.surgery.runtimes import VLLM_MAX_LORA_RANKS, check_runtime
from webui.backends.base import Backend, Capabilities, LoadedInfo, RowDelta, RowDone, TokenScores, incremental_texts
from webui.backends.remote import guard
from webui.backends.remote.engines import ENGINES, Dialect, Http, detect
from webui.errors import BadInput, EngineUnavailable, Incompatible, LoadFailed, Unsupported
from webui.options.config import GenerationParams, ModelSpec
from webui.progress import Progress, no_progress

# the `inspect --target` runtime whose rules each engine's dialect follows (webui/adapters/surgery/runtimes.py)
RUNTIME_OF = {"vllm": "vllm", "sglang": "sglang", "lorax": "lorax", "llama-server": "llamacpp", "loradeck": "loradeck"}

class RemoteBackend(Backend):
    name = "remote"
    settings = ("remote_engine", "remote_api_key", "remote_adapter_root", "remote_timeout")
    requires = ("httpx",)
    embedded_by_default = False

    def __init__(self):
        self.http: Http | None = None
        self.dialect: Dialect | None = None
        self.info: LoadedInfo | None = None
        self._loaded: dict[str, tuple] = {}   # adapter name -> file signature
        self._active: dict[str, float] = {}
        self._lock = threading.Lock()         # re-reading the engine's adapter state after a failure
        self._stale = False
        self._reference = None                # the base's probe (the silent no-op guard), None: not checked

    @classmethod
    def claims_address(cls, model: str) -> bool:
        return model.strip().lower().startswith(("http://", "https://"))

    # -- lifecycle -----------------------------------------------------------------------------------------
    def load(self, path: Path, spec: ModelSpec, progress: Progress = no_progress) -> LoadedInfo:
        url = spec.model.strip()
        if not RemoteBackend.claims_address(url):  # (the managed loaders claim no address themselves)
            raise LoadFailed(f"the remote loader needs the engine's URL (http://HOST:PORT), not {url!r}")
        progress(0.1, f"connecting to {url}")
        self.http = Http(url, spec.remote_api_key, spec.remote_timeout)
        try:
            cls = detect(self.http) if spec.remote_engine == "auto" else ENGINES[spec.remote_engine]
            self.dialect = cls(self.http, spec.remote_adapter_root)
            self.dialect.describe()
        except Exception as e:
            self.http.close()
            raise LoadFailed(f"cannot use the engine at {url}: {e}") from None
        self._reference = guard.reference(self.dialect)
        self.info = LoadedInfo(name=self.dialect.base, path=url, loader=self.name, device=f"{cls.name} at {url}",
                               architecture=cls.name, context_length=self.dialect.context_length)
        progress(1.0, f"{cls.name} at {url} serves {self.dialect.base}")
        return self.info

    def unload(self) -> None:
        if self.http is not None:
            self.http.close()
        self.http = self.dialect = None
        self._loaded, self._active = {}, {}

    @property
    def capabilities(self) -> Capabilities:
        d = self.dialect
        return Capabilities(loader=self.name, samplers=d.samplers(), settings=self.settings, adapters=True,
                            adapter_stack=d.adapter_stack, merge=False, mixed_batch=False, concurrent=True,
                            extra={"engine": d.name, "url": self.http.url})

    def engine_status(self, ours: dict | None = None) -> dict:
        """What the Model tab shows: the engine, its base model and context, and which of our adapters (`ours`:
        name -> folder) it can serve; `loads_on_request`: the engine loads adapters at run time (vLLM, SGLang,
        LoRAX), so `served` lists those it holds now and the others are loaded when picked."""
        d = self.dialect
        status = {"engine": d.name, "url": self.http.url, "base": d.base, "context_length": d.context_length,
                  "loads_on_request": d.loads_on_request, "served": [], "error": "",
                  "guarded": self._reference is not None}
        try:
            status["served"] = d.serving(ours or {})
        except Exception as e:  # a status line must not fail: say why the list is missing
            status["error"] = str(e)
        return status

    # -- text ----------------------------------------------------------------------------------------------
    def chat_prompt(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        return self.dialect.chat_prompt(messages, add_generation_prompt)

    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        return self.dialect.tokenize(text, add_special)

    def count_tokens(self, text: str) -> int:
        # engines without a tokenizer route (OpenAI-style, LoRAX): the count is unknown, reported as 0
        return len(self.tokenize(text)) if self.dialect.tokenizes else 0

    def token_texts(self, ids: list[int]) -> list[str]:
        return incremental_texts(self.detokenize, ids)

    def detokenize(self, ids: list[int]) -> str:
        return self.dialect.detokenize(ids)

    def score(self, sequences: list[list[int]], top_k: int = 0) -> list[TokenScores]:
        """Per-token log-probabilities under the active stack, where the engine gives prompt log-probabilities
        (vLLM); the sequences go to it at once."""
        if not self.dialect.scores:
            raise Unsupported(f"the {self.dialect.name} engine cannot score tokens through LoRA Deck (logprobs, echo, "
                              f"perplexity, evaluation): ask {self.http.url} for logprobs directly")
        stack = self._served(dict(self._active))
        self._ensure_registered(stack)
        with ThreadPoolExecutor(min(8, len(sequences)), thread_name_prefix="remote-score") as pool:
            return list(pool.map(lambda ids: self.dialect.score(ids, top_k, stack), sequences))

    def prepare_response_format(self, response_format: str) -> None:
        if response_format and not self.dialect.response_format:
            raise Unsupported(f"the {self.dialect.name} engine is not sent response formats by LoRA Deck")

    def stream_batch(self, prompts: list[str], params: GenerationParams, adapter_names: list | None = None,
                     cancel: threading.Event | None = None) -> Iterator[tuple]:
        """Every row as its own request to the engine, all at once (threads): the engine batches them. A row's
        entry in `adapter_names` is a whole stack ({name: weight}), one adapter name, or None (the plain base);
        without `adapter_names` every row uses the active stack."""
        cancel = cancel or threading.Event()
        events: queue.Queue = queue.Queue()

        def stack_of(row: int) -> dict:
            if adapter_names is None:
                return dict(self._active)
            entry = adapter_names[row]
            return dict(entry) if isinstance(entry, dict) else {} if entry is None else {entry: 1.0}

        def run(row: int) -> None:
            text, finish, tokens = "", "stop", None
            try:
                for delta, reason, count in self._events(prompts[row], params, stack_of(row), cancel):
                    if delta:
                        text += delta
                        events.put(RowDelta(row, delta))
                    finish, tokens = reason or finish, count if count is not None else tokens
                events.put(RowDone(row, finish, tokens))
            except Exception as e:  # handed to the consumer, which raises it
                events.put(e)

        threads = [threading.Thread(target=run, args=(row,), name="remote-row", daemon=True)
                   for row in range(len(prompts))]
        for t in threads:
            t.start()
        try:
            for _ in range(len(prompts)):
                while True:
                    event = events.get()
                    if isinstance(event, Exception):
                        raise event
                    yield event
                    if isinstance(event, RowDone):
                        break
        finally:
            cancel.set()  # rows still streaming (the consumer left early) drop their connections

    def _events(self, prompt: str, params: GenerationParams, stack: dict,
                cancel: threading.Event | None) -> Iterator[tuple[str, str | None, int | None]]:
        """(text, finish reason, completion tokens) of one streamed request. A request that fails before its
        first token after the engine's adapter state may have changed (a restart) is retried once with that
        state read again."""
        missing = [n for n in stack if n not in self._loaded]
        if missing:
            raise BadInput(f"adapter(s) {', '.join(missing)} are not loaded")
        stack = self._served(stack, prompt)
        self._ensure_registered(stack)
        for attempt in (0, 1):
            if self._stale or attempt:
                self._refresh(stack)
            route, body = self.dialect.request(prompt, params, stack)
            started = False
            try:
                for event in self.http.events(route, body, cancel):
                    text, reason, tokens = self.dialect.parse(event)
                    started = started or bool(text)
                    yield text, reason, tokens
                return
            except (BadInput, EngineUnavailable):
                self._stale = True
                if started or attempt or not stack:
                    raise
                # retry once: the engine may have been restarted and forgotten the adapters

    def _served(self, stack: dict, prompt=None) -> dict:
        """`stack` as the engine can take it (for `prompt`): itself, or where a request carries one adapter a
        weighted stack's blend ({name: 1.0}), written and registered on first use, keyed by the sources' files
        and weights."""
        single = len(stack) == 1 and next(iter(stack.values())) == 1.0
        if not stack or single or self.dialect.takes_stack(prompt):
            return stack
        key = json.dumps(sorted((n, float(w), repr(self._loaded[n])) for n, w in stack.items()))
        name = "stack-" + hashlib.sha1(key.encode()).hexdigest()[:16]
        with self._lock:
            d = self.dialect
            if name not in d.folders:
                from webui.adapters.file_blend import cat_blend  # torch: only a stack on such an engine needs it

                sources = [(Path(d.folders[n]), w) for n, w in stack.items()]
                folder = sources[0][0].parent / f".{name}"  # hidden: not one of the user's adapters
                if not folder.is_dir():
                    cat_blend(sources, folder)
                self._register(name, folder)
        return {name: 1.0}

    def _ensure_registered(self, stack: dict) -> None:
        """Register again the adapters of `stack` the engine no longer holds (a managed engine that restarted)."""
        if not all(self.dialect.ready(n) for n in stack):
            with self._lock:
                for n in stack:
                    if not self.dialect.ready(n):
                        self._register(n, self.dialect.folders[n])

    def _register(self, name: str, folder: Path) -> None:
        """Register `name` with the engine and check that the engine applies it, and only it (guard.check); a
        failed check takes it off the engine again. Called under the lock."""
        d = self.dialect
        d.forget(name)  # changed files: register again
        d.prepare(name, folder)
        d.folders[name] = folder
        try:
            guard.check(d, name, self._reference, [n for n in d.folders if n != name and d.ready(n)])
        except Exception:
            d.unregister(name)
            d.folders.pop(name, None)
            self._loaded.pop(name, None)  # asked for again, it is loaded and checked again
            self._active.pop(name, None)
            raise

    def _refresh(self, stack: dict) -> None:
        """Read the engine's adapter state again (after a failure: it may have restarted) and re-register the
        adapters of `stack` where the engine needs that."""
        with self._lock:
            d = self.dialect
            if hasattr(d, "table"):
                d.table = None
            for name in list(d.folders):  # a restarted engine forgot every registration, not only these
                d.forget(name)
            for name in stack:
                self._register(name, d.folders[name])
            self._stale = False

    # -- adapters --------------------------------------------------------------------------------------------
    def describe_base(self):
        """None: the base lives on the engine, so adapter reports are of the files alone; the engine checks
        the fit when it loads the adapter."""

    @property
    def adapters_loaded(self) -> dict:
        return dict(self._loaded)

    @property
    def active_adapters(self) -> dict:
        return dict(self._active)

    def load_adapter(self, name: str, files, state: dict, report) -> None:
        self._check_runs_there(files, state)
        with self._lock:
            self._before_register(name, Path(files.path))
            self._register(name, Path(files.path))
        self._loaded[name] = files.signature()

    def _before_register(self, name: str, folder: Path) -> None:
        """What the engine needs before it can take `name` (a managed llama-server: a restart with it)."""

    def _check_runs_there(self, files, state: dict) -> None:
        """Refuse, before the engine sees it, an adapter the engine would reject or silently run without part of
        it (a DoRA magnitude, saved modules, LoRA biases: `inspect --target`'s rules), with every reason and the
        command that fixes it. An OpenAI-compatible server of unknown kind is not judged."""
        runtime = RUNTIME_OF.get(self.dialect.name)
        if runtime is None:
            return
        # the engine's own --max-lora-rank is not visible from here: only the largest vLLM takes is assumed, and an
        # engine started with a smaller one refuses a bigger rank itself, with its own message
        verdict = check_runtime(files, state, runtime, max_lora_rank=max(VLLM_MAX_LORA_RANKS))
        if not verdict.runs:
            reasons = "; ".join(r["problem"] + (f" (fix: {r['fix']})" if r["fix"] else "") for r in verdict.reasons)
            raise Incompatible(f"{files.name} does not run on the {self.dialect.name} engine: {reasons}",
                               code="adapter_unsupported_by_engine")

    def set_adapters(self, weights: dict[str, float]) -> None:
        missing = [n for n in weights if n not in self._loaded]
        if missing:
            raise BadInput(f"adapter(s) {', '.join(missing)} are not loaded")
        self._served(weights)  # a stack the engine takes as one blended adapter: written and registered now
        self._active = dict(weights)

    def delete_adapter(self, name: str) -> None:
        self._loaded.pop(name, None)
        self._active.pop(name, None)
        with self._lock:
            self.dialect.unregister(name)  # off the engine's list (vLLM keeps its slot until it restarts)
            self.dialect.folders.pop(name, None)

    def merge_adapters(self) -> None:
        raise Unsupported("cannot merge adapters into a remote engine's base: its weights live on the engine; "
                          "export a merged model (python -m webui export) and start the engine on that")

    def unmerge_adapters(self) -> None:
        raise Unsupported("nothing is merged on a remote engine")

    def save_merged(self, out_dir: Path) -> None:
        self.merge_adapters()

    def blend_adapters(self, weights, new_name, combination_type, out_dir, density=None, **options) -> Path:
        raise Unsupported("blending needs the base model's weights, which live on the remote engine: run "
                          "python -m webui blend --model BASE on a machine that has the base")
