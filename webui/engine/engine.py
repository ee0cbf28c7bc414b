"""The Engine: the one stateful object of LoRA Deck. It owns the loaded backend (model) and serializes
everything that touches it: the scheduler's running batch holds its lock, and a model change waits for it to
finish, so UI tabs and API clients never see a half-changed model. Tokenizer and template work waits only for a
model change, never for a generation. The web UI and the HTTP API are thin clients of one Engine created at
start-up, and `submit` is their one door for generation (the scheduler is the Engine's private part).

Loading is safe by construction: the new model is checked (`preflight`) while the old one stays loaded;
if the real load still fails, the previous model is loaded again and the error names the problem.
"""
from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Iterator

from webui.adapters.files import check_adapter_name, list_adapters, load_weights, read_adapter, resolve_adapter
from webui.adapters.inspect import Report, inspect_adapter
from webui.backends import machine, models
from webui.backends.base import Backend, Capabilities, LoadedInfo, TokenScores, stack_kept
from webui.backends.registry import backend_class, loader_options
from webui.errors import BadInput, Incompatible, LoadFailed, LoraDeckError, NoModelLoaded, Unsupported, first_line
from webui.options.config import GenerationParams, ModelSpec
from webui.progress import Progress, no_progress
from webui.training.live import is_live, live_names, resolve_live

from .lock import ModelLock
from .scheduler import JobHandle, Scheduler  # the Engine's private part
from .stack import UI_STACK, Stack, check_weights, stack_of

log = logging.getLogger(__name__)


@dataclass
class LoadResult:
    info: LoadedInfo
    seconds: float
    kept: dict = field(default_factory=dict)  # the active stack carried over from the same model on another loader
    dropped: str = ""                         # why the previous stack was not carried over, when it was not


class Engine:
    def __init__(self, models_dir: Path | str = "models", loras_dir: Path | str = "loras",
                 runs_dir: Path | str | None = None):
        self.models_dir = Path(models_dir)
        self.loras_dir = Path(loras_dir)
        self.runs_dir = Path(runs_dir) if runs_dir else None  # training runs: their live checkpoints are adapters
        self._backend: Backend | None = None
        self._spec: ModelSpec | None = None
        # Held by a generation (or the scheduler's running batch) for its whole duration and by model changes.
        self._lock = ModelLock()
        # Held while the model is replaced; tokenizer and chat-template work takes only this one, so it never
        # waits for a generation (a request is tokenized while others run) but does wait for a load.
        self._swap = threading.Lock()
        self.last_load_seconds = 0.0
        # private: batches the requests `submit` queues (its worker thread starts with the first request)
        self._scheduler = Scheduler(self)
        self._reports: dict = {}  # adapter_report cache
        self._adapter_paths: dict[str, Path] = {}  # each cached adapter's folder (a failed load restores from it)

    # -- model ---------------------------------------------------------------------------------------
    @property
    def loaded(self) -> LoadedInfo | None:
        return self._backend.info if self._backend else None

    @property
    def spec(self) -> ModelSpec | None:
        return self._spec

    @property
    def capabilities(self) -> Capabilities | None:
        return self._backend.capabilities if self._backend else None

    def engine_status(self) -> dict | None:
        """What a remote engine says about itself (see Backend.engine_status); asked without the model lock,
        since it is a status line and the engine answers it beside running requests."""
        backend = self._backend
        if backend is None:
            return None
        return backend.engine_status({name: self.loras_dir / name for name in self.list_adapters()})

    def list_models(self) -> list[str]:
        return models.list_models(self.models_dir)

    def load(self, spec: ModelSpec, progress: Progress = no_progress) -> LoadResult:
        """Load `spec`, replacing the current model. On failure the previous model is loaded again
        (it stays usable) and LoadFailed says why the new one failed."""
        start = time.perf_counter()
        path, loader = models.resolve(spec.model, spec.loader, self.models_dir, progress, loader_options(spec))
        cls = backend_class(loader)
        cls.preflight(path, spec)
        self._check_memory(cls, path, spec)
        with self._lock, self._swap:
            previous = self._spec
            # what the restore must bring back with the model: its active stack (with the folders of names
            # outside the adapters dir) and whether it was merged — not just the plain base
            stack = {n: self._adapter_paths.get(n) for n in self.active_adapters}
            weights, was_merged = self.active_adapters, self.merged
            self._unload_locked()
            try:
                backend = cls()
                info = backend.load(path, replace(spec, loader=loader), progress)
            except Exception as e:
                reason = e if isinstance(e, LoadFailed) else LoadFailed(f"could not load {path.name}: {first_line(e)}")
                if previous is not None:
                    log.warning("load of %s failed (%s); restoring %s", path.name, reason, previous.model or "embedded")
                    try:
                        self._load_locked(previous)
                        self._restore_stack_locked(weights, was_merged, {n: p for n, p in stack.items() if p})
                    except Exception:
                        log.exception("could not restore the previous model")
                raise reason from e
            self._backend, self._spec = backend, replace(spec, loader=loader)
            self._adapter_paths = {}
            kept, dropped = self._carry_stack_locked(previous, weights, {n: p for n, p in stack.items() if p})
        self.last_load_seconds = time.perf_counter() - start
        # one line per load, whoever asked (start-up, the Model tab): the log shows every base (re)load
        log.info("loaded %s on %s (%s, %s) in %.1f s", info.name, info.loader, info.device, info.dtype,
                 self.last_load_seconds)
        return LoadResult(info, self.last_load_seconds, kept, dropped)

    def _check_memory(self, cls, path: Path, spec: ModelSpec) -> None:
        """Refuse, with both figures, a load that cannot fit in the memory free once the current model is
        unloaded: the kernel would kill the process half-way, and the model loaded now with it."""
        need = cls.memory_need(path, spec)
        if need:
            held = self._backend.memory_held() if self._backend is not None else 0
            machine.check_fits(f"loading {path.name} ({cls.name})", need, free=machine.available() + held,
                               note="(counting the memory the model loaded now would free)" if held else "")

    def memory_estimate(self, spec: ModelSpec) -> tuple[int, int] | None:
        """(bytes a load of `spec` needs, bytes free for it) for the Model tab, before anything is loaded; None
        when not estimated (the embedded model, a remote engine, GPU memory) or when the model is not found."""
        if not spec.model:
            return None
        try:
            path, loader = models.resolve(spec.model, spec.loader, self.models_dir, wanted=loader_options(spec))
            need = backend_class(loader).memory_need(path, spec)
        except Exception:  # noqa: BLE001  (an estimate; the load itself names what is wrong)
            return None
        held = self._backend.memory_held() if self._backend is not None else 0
        return (need, machine.available() + held) if need else None

    def _load_locked(self, spec: ModelSpec) -> None:
        path, loader = models.resolve(spec.model, spec.loader, self.models_dir, wanted=loader_options(spec))
        backend = backend_class(loader)()
        backend.load(path, spec)
        self._backend, self._spec = backend, spec

    def _carry_stack_locked(self, previous: ModelSpec | None, weights: dict, paths: dict) -> tuple[dict, str]:
        """The same model loaded again (on another loader, or with other settings) keeps its active adapters where
        the new loader can apply them, unmerged; another model starts plain (the adapters were checked against
        the old one). Returns (kept stack, why it was not kept)."""
        if not weights or previous is None or previous.model != self._spec.model:
            return {}, ""
        backend = self._require()
        if not backend.capabilities.adapters or (len(weights) > 1 and not backend.capabilities.adapter_stack):
            return {}, f"the {backend.name} loader cannot apply this stack"
        try:
            self._restore_stack_locked(weights, False, paths)
        except LoraDeckError as e:
            for name in list(backend.adapters_loaded):
                backend.delete_adapter(name)
            return {}, first_line(e)
        return backend.active_adapters, ""

    def _restore_stack_locked(self, weights: dict[str, float], merged: bool, paths: dict) -> None:
        """Bring back an active stack (and its merge) on a model loaded again after a failed load."""
        if not weights:
            return
        backend = self._require()
        self._load_missing(backend, weights, paths)
        backend.set_adapters(dict(weights))
        if merged:
            backend.merge_adapters()

    def unload(self) -> None:
        with self._lock, self._swap:
            self._unload_locked()

    def _unload_locked(self) -> None:
        if self._backend is not None:
            self._backend.unload()
        self._backend, self._spec = None, None

    @contextmanager
    def locked_backend(self):
        """Hold the model for a multi-step job (the scheduler's batches): yields the loaded backend."""
        with self._lock:
            yield self._require()

    @property
    def model_wanted(self) -> bool:
        """Does a thread wait for the model (see ModelLock)?"""
        return self._lock.wanted

    def current_backend(self) -> Backend | None:
        """The loaded backend, read without any lock: for work that is right to redo if the model changes
        meanwhile (the scheduler tokenizes a prompt in the caller's thread and checks it is still this one)."""
        return self._backend

    def _require(self) -> Backend:
        if self._backend is None:
            raise NoModelLoaded()
        return self._backend

    # -- text -----------------------------------------------------------------------------------------
    def chat_prompt(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        with self._swap:
            return self._require().chat_prompt(messages, add_generation_prompt)

    def count_tokens(self, text: str) -> int:
        with self._swap:
            return self._require().count_tokens(text)

    def prepare_response_format(self, response_format: str) -> None:
        """Refuse, before anything is queued, a response format the loaded loader cannot enforce."""
        with self._swap:
            self._require().prepare_response_format(response_format)

    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        with self._swap:
            return self._require().tokenize(text, add_special)

    def token_texts(self, ids: list[int]) -> list[str]:
        with self._swap:
            return self._require().token_texts(ids)

    def detokenize(self, ids: list[int]) -> str:
        with self._swap:
            return self._require().detokenize(ids)

    @property
    def eos_token_id(self) -> int | None:
        with self._swap:
            return self._require().eos_token_id

    def score(self, sequences: list[str | list[int]], adapters: Stack | dict[str, float] = UI_STACK,
              top_k: int = 0, paths: dict | None = None) -> list[TokenScores]:
        """Per-token log-probabilities of texts (tokenized as generation does) or token id lists, under
        `adapters` (a weighted stack; {} = the plain base; UI_STACK = the active stack; `paths` gives folders for
        names outside the adapters dir). The active stack, merged or not, is the same afterwards."""
        adapters = stack_of(adapters)
        with self._lock:
            backend = self._require()
            ids = [backend.tokenize(s) if isinstance(s, str) else list(s) for s in sequences]
            too_short = [i for i, s in enumerate(ids) if len(s) < 2]
            if too_short:
                raise BadInput(f"sequence {too_short[0]} has fewer than 2 tokens: nothing to score")
            if adapters is UI_STACK or adapters == backend.active_adapters:
                return backend.score(ids, top_k)
            if adapters and not backend.capabilities.adapters:
                raise Unsupported(f"the {backend.name} loader cannot apply LoRA adapters")
            with stack_kept(backend):
                self._load_missing(backend, adapters, paths)  # cached afterwards, as set_adapters leaves them
                backend.set_adapters(dict(adapters))
                return backend.score(ids, top_k)

    # -- generation: one door ------------------------------------------------------------------------------
    def submit(self, prompt: str | list[dict], params: GenerationParams | None = None,
               adapters: Stack | dict[str, float] = UI_STACK, cancel: threading.Event | None = None) -> JobHandle:
        """The one way to generate: queue a request and get its handle at once (iterate it for text deltas, or
        `text()` for the whole reply; closing it cancels the request). Every client — the Chat tab, compare
        mode, evaluation, each API dialect, scripts — comes through here, so they all take the path that
        batches (continuous batching where the loader has a decoder). `prompt` is text, or chat messages
        rendered with the model's template; `adapters` is the request's own stack ({} = the plain base; adapters it
        names must be cached first: `prepare_adapters`) or UI_STACK, the stack active in the UI when the request
        runs; `cancel`, when given, is the request's cancel event. Stop strings end the reply."""
        params = params or GenerationParams()
        stack = stack_of(adapters)
        if stack is UI_STACK:
            self._refresh_live()
        if not isinstance(prompt, str):
            prompt = self.chat_prompt(prompt)
        return self._scheduler.submit(prompt, params, stack, cancel)

    def _refresh_live(self) -> None:
        """A live checkpoint in the active stack (`RUN@latest` picked in the UI) follows the run's newer saves:
        hot-swapped in before the next request that uses the active stack. Checked without the lock first."""
        active = self.active_adapters
        live = [n for n in active if is_live(n)]
        if live and not self._cached(live, None) and not self.merged:
            self.set_adapters(active)

    def fan_out(self, prompt: str | list[dict], params: GenerationParams | None,
                stacks: list[Stack | dict[str, float]]) -> list[JobHandle]:
        """One prompt answered by several stacks (the plain base = {}): every request is queued before any is
        waited on, so they share a batch where the loader mixes adapters in one (transformers, GPTQ) and run one
        after another where it cannot. Compare mode and the API's `compare` field both come here."""
        if not isinstance(prompt, str):
            prompt = self.chat_prompt(prompt)
        return [self.submit(prompt, params, stack) for stack in stacks]

    @property
    def max_batch(self) -> int:
        """Rows per forward pass on the static batch path (what an engine's /info reports)."""
        return self._scheduler.max_batch

    def generate(self, prompt: str | list[dict], params: GenerationParams | None = None,
                 cancel: threading.Event | None = None, adapters: Stack | dict[str, float] = UI_STACK) -> str:
        """The whole reply at once (`submit`, then wait), cut before the first stop string."""
        handle = self.submit(prompt, params, adapters, cancel)
        try:
            return handle.text()
        finally:
            handle.close()

    def stream(self, prompt: str | list[dict], params: GenerationParams | None = None,
               cancel: threading.Event | None = None, adapters: Stack | dict[str, float] = UI_STACK) -> Iterator[str]:
        """Text deltas of the reply to a prompt (or to chat messages), through `submit`; leaving the iteration
        early, or setting `cancel`, ends the request."""
        yield from self.submit(prompt, params, adapters, cancel)

    def stream_chat(self, messages: list[dict], params: GenerationParams | None = None,
                    cancel: threading.Event | None = None) -> Iterator[str]:
        """Stream the assistant's reply to OpenAI-style `messages`, rendered with the chat template."""
        return self.stream(messages, params, cancel)

    # -- adapters -------------------------------------------------------------------------------------
    def list_adapters(self) -> list[str]:
        """The adapters folder's adapters (what the library manages)."""
        return list_adapters(self.loras_dir)

    def live_adapters(self) -> list[str]:
        """The live checkpoints of running training runs: `RUN@latest`, `RUN@step-N` (webui.training.live)."""
        return live_names(self.runs_dir) if self.runs_dir else []

    def adapter_choices(self) -> list[str]:
        """Every adapter a request or a picker may name: the adapters folder, then the live checkpoints."""
        return [*self.list_adapters(), *self.live_adapters()]

    @property
    def active_adapters(self) -> dict[str, float]:
        return self._backend.active_adapters if self._backend else {}

    @property
    def merged(self) -> bool:
        return bool(self._backend and self._backend.merged)

    @property
    def in_use(self) -> bool:
        """Is the model working now (a batch, a scoring pass, a model change)? Its active adapters may then be a
        request's own stack for the moment, not the one the UI chose."""
        return self._lock.held

    def adapter_path(self, name: str) -> Path:
        """Where an adapter name's files are: a folder of the adapters dir, or a live checkpoint's folder."""
        return self._adapter_path(name, None)

    def _adapter_path(self, name: str, paths: dict | None) -> Path:
        if paths and name in paths:
            return Path(paths[name])
        if self.runs_dir and is_live(name):
            return resolve_live(name, self.runs_dir, self.loras_dir)
        return resolve_adapter(name, self.loras_dir)

    def adapter_report(self, name: str, path: Path | None = None) -> Report:
        """The compatibility report of an adapter for the loaded base (files only when no base is loaded
        or the loader cannot take adapters). Raises BadInput for unreadable adapters. Reports are
        cached per adapter files and base, so listing many adapters stays cheap."""
        files = read_adapter(path or self._adapter_path(name, None), name)
        with self._lock:
            backend = self._backend
            base = backend.describe_base() if backend and backend.capabilities.adapters else None
        key = (name, files.signature(), id(backend), base.name if base else None)
        if key not in self._reports:
            self._reports = {k: v for k, v in self._reports.items() if k[0] != name}
            self._reports[key] = inspect_adapter(files, load_weights(files), base)
        return self._reports[key]

    def base_key(self) -> str:
        """Names what adapter reports are checked against: a digest of the loaded base's name and adaptable
        layers ("files-only" with no base, or a loader that takes no adapters). Keys the on-disk report cache."""
        backend = self._backend  # no lock: the LoRA list asks while a generation holds the model
        if backend is None or not backend.capabilities.adapters:
            return "files-only"
        base = backend.describe_base()  # read-only and cached by the backends: hashing it takes about a ms
        if base is None:  # a remote engine: its base's layers are not visible from here
            return "files-only"
        text = json.dumps([base.name, base.model_type, base.num_layers, sorted(base.params),
                           sorted((k, *asdict(v).values()) for k, v in base.layers.items())])
        return hashlib.sha1(text.encode()).hexdigest()[:16]

    @contextmanager
    def adapter_released(self, name: str):
        """Hold the model while an adapter's files are renamed or moved to the trash (the library's file
        operations): refused while the adapter is active (the loaded model uses it); a cached, inactive copy
        is dropped first, so the model never refers to files that are gone."""
        with self._lock:
            backend = self._backend
            if backend is not None and name in backend.active_adapters:
                raise BadInput(f"{name} is active in the loaded model: remove it from the active adapters "
                               "(untick it) first, then rename or delete it")
            if backend is not None and name in backend.adapters_loaded:
                backend.delete_adapter(name)
            self._reports = {k: v for k, v in self._reports.items() if k[0] != name}
            yield

    def _load_missing(self, backend: Backend, names, paths: dict | None) -> list[str]:
        """Read, check and cache adapters the backend does not hold yet (or whose files changed). All are
        checked before any is loaded, so a bad one changes nothing. Returns the names newly loaded."""
        prepared = {}
        for name in names:
            files = read_adapter(self._adapter_path(name, paths), name)
            if backend.adapters_loaded.get(name) == files.signature():
                continue  # cached and unchanged: switching is instant
            state = load_weights(files)
            report = inspect_adapter(files, state, backend.describe_base())
            if not report.compatible:
                raise Incompatible(report.summary(), report=report)
            prepared[name] = (files, state, report)
            self._adapter_paths[name] = self._adapter_path(name, paths)
        added = []
        try:
            for name, (files, state, report) in prepared.items():
                backend.load_adapter(name, files, state, report)
                added.append(name)
        except Exception:
            for name in added:
                backend.delete_adapter(name)
            raise
        return added

    def _cached(self, names, paths: dict | None) -> bool:
        """Are these adapters all cached by the loaded model, their files unchanged? Read without the model's
        lock, which a running batch holds until its last row ends: a request naming cached adapters is then
        queued at once and joins that batch, instead of waiting for it to drain (and, while waiting, holding
        back every request behind it). Whatever this cannot tell goes to the locked path, which reports it."""
        backend = self._backend
        if backend is None or not names:
            return False
        try:
            loaded = backend.adapters_loaded
            return all(loaded.get(n) == read_adapter(self._adapter_path(n, paths), n).signature() for n in names)
        except Exception:  # an unreadable adapter, or the cache changing under us: the locked path decides
            return False

    def prepare_adapters(self, names, paths: dict | None = None) -> None:
        """Make sure these adapters are cached (checked and loaded, not activated): what a request that
        names its own adapters needs before it is queued."""
        if self._cached(names, paths):
            return
        with self._lock:
            backend = self._require()
            if names and not backend.capabilities.adapters:
                raise Unsupported(f"the {backend.name} loader cannot apply LoRA adapters")
            self._load_missing(backend, names, paths)

    def set_adapters(self, weights: dict[str, float], paths: dict | None = None) -> dict[str, float]:
        """Make exactly `weights` the active stack (hot-swap; {} = the plain base). Adapters not cached yet
        are read and checked first — all of them, before anything changes — so a bad one leaves the model
        and the active stack as they were. `paths` gives folders for names outside the adapters dir."""
        check_weights(weights)
        with self._lock:
            backend = self._require()
            if weights and not backend.capabilities.adapters:
                raise Unsupported(f"the {backend.name} loader cannot apply LoRA adapters")
            previous = backend.active_adapters
            added = self._load_missing(backend, weights, paths)
            try:
                backend.set_adapters(dict(weights))
            except Exception:
                for name in added:
                    backend.delete_adapter(name)
                backend.set_adapters({n: w for n, w in previous.items() if n in backend.adapters_loaded})
                raise
            return backend.active_adapters

    def clear_adapters(self) -> None:
        self.set_adapters({})

    def merge_adapters(self) -> None:
        """Merge the active stack into the base weights (faster decoding; unmerge restores the base)."""
        with self._lock:
            self._require().merge_adapters()

    def unmerge_adapters(self) -> None:
        with self._lock:
            self._require().unmerge_adapters()

    def save_merged(self, out_dir: Path) -> None:
        """Write the base with the active adapters merged in, loadable with no adapter. The backend may give up
        its loaded model to do it (PEFT's merge_and_unload), so this is for an Engine of its own (exports):
        the model is unloaded afterwards."""
        with self._lock, self._swap:
            try:
                self._require().save_merged(Path(out_dir))
            finally:
                self._unload_locked()

    def blend_adapters(self, weights: dict[str, float], new_name: str, combination_type: str = "cat",
                       density: float | None = None, out_dir: Path | None = None, paths: dict | None = None,
                       **options) -> Path:
        """Combine adapters into a new one saved in `out_dir` (default: the adapters folder) with PEFT's
        add_weighted_adapter, checked against the stack (webui/adapters/exact_blend.py; `options`: its other
        arguments, e.g. majority_sign_method; `paths`: folders for names outside the adapters dir). The active
        stack is the same afterwards."""
        check_adapter_name(new_name, self.loras_dir)
        check_weights(weights)
        with self._lock:
            backend = self._require()
            if not backend.capabilities.adapters:
                raise Unsupported(f"the {backend.name} loader cannot apply LoRA adapters")
            with stack_kept(backend):
                self._load_missing(backend, weights, paths)  # reads and checks any that are not cached yet
                backend.set_adapters(dict(weights))
                try:
                    return backend.blend_adapters(weights, new_name, combination_type,
                                                  Path(out_dir or self.loras_dir), density, **options)
                except Unsupported as e:
                    if combination_type != "cat":
                        raise Unsupported(f"{first_line(e)}; `cat` (exact) works on every loader, the others need "
                                          "the base's weights in memory (the transformers or GPTQ loader)") from None
                    return self._file_blend(weights, new_name, Path(out_dir or self.loras_dir), paths)

    def _file_blend(self, weights: dict[str, float], new_name: str, out_dir: Path, paths: dict | None) -> Path:
        """A loader that cannot run PEFT on its base (llama.cpp, a remote engine) still gets the exact `cat` blend:
        made from the adapters' files alone (webui.adapters.file_blend), then checked like any new adapter."""
        from webui.adapters.file_blend import cat_blend  # torch: only this path needs it here

        sources = []
        for name, weight in weights.items():
            path = self._adapter_path(name, paths)
            if read_adapter(path, name).format == "gguf":
                raise Unsupported(f"{name} is a GGUF LoRA file: blends are made from PEFT adapter folders")
            sources.append((path, weight))
        out = out_dir / new_name
        if out.exists():
            raise BadInput(f"{out} exists already: pick another name for the blend")
        return cat_blend(sources, out)
