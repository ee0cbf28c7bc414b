"""The Engine: the one stateful object of LoRA Deck. It owns the loaded backend (model) and serializes
everything that touches it: generations run one at a time under its lock, and a model change waits for
the running generation to finish, so UI tabs and API clients never see a half-changed model. The web UI
and the HTTP API are thin clients of one Engine created at start-up.

Loading is safe by construction: the new model is checked (`preflight`) while the old one stays loaded;
if the real load still fails, the previous model is loaded again and the error names the problem.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

from webui import models
from webui.backends import backend_class
from webui.backends.base import (Backend, Capabilities, LoadedInfo, ModelLoadError, Progress, no_progress)
from webui.config import GenerationParams, ModelSpec
from webui.stop_strings import StopStringFilter, cut_at_stop

log = logging.getLogger(__name__)


class NoModelLoaded(RuntimeError):
    def __init__(self):
        super().__init__("no model is loaded: pick one on the Model tab")


@dataclass
class LoadResult:
    info: LoadedInfo
    seconds: float


class Engine:
    def __init__(self, models_dir: Path | str = "models", loras_dir: Path | str = "loras"):
        self.models_dir = Path(models_dir)
        self.loras_dir = Path(loras_dir)
        self._backend: Backend | None = None
        self._spec: ModelSpec | None = None
        # Held by a generation for its whole duration and by model changes. A plain Lock, not an RLock:
        # a streaming generator may be resumed on a different thread (Gradio runs each step in a worker
        # pool), and only a plain Lock may be released by a thread other than the one that took it.
        self._lock = threading.Lock()
        self.last_load_seconds = 0.0

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

    def list_models(self) -> list[str]:
        return models.list_models(self.models_dir)

    def load(self, spec: ModelSpec, progress: Progress = no_progress) -> LoadResult:
        """Load `spec`, replacing the current model. On failure the previous model is loaded again
        (it stays usable) and ModelLoadError says why the new one failed."""
        start = time.perf_counter()
        path, loader = models.resolve(spec.model, spec.loader, self.models_dir, progress)
        cls = backend_class(loader)
        cls.preflight(path, spec)
        with self._lock:
            previous = self._spec
            self._unload_locked()
            try:
                backend = cls()
                info = backend.load(path, replace(spec, loader=loader), progress)
            except Exception as e:
                reason = e if isinstance(e, ModelLoadError) else ModelLoadError(f"could not load {path.name}: {e}")
                if previous is not None:
                    log.warning("load of %s failed (%s); restoring %s", path.name, reason, previous.model or "embedded")
                    try:
                        self._load_locked(previous)
                    except Exception:
                        log.exception("could not restore the previous model")
                raise reason from e
            self._backend, self._spec = backend, replace(spec, loader=loader)
        self.last_load_seconds = time.perf_counter() - start
        return LoadResult(info, self.last_load_seconds)

    def _load_locked(self, spec: ModelSpec) -> None:
        path, loader = models.resolve(spec.model, spec.loader, self.models_dir)
        backend = backend_class(loader)()
        backend.load(path, spec)
        self._backend, self._spec = backend, spec

    def unload(self) -> None:
        with self._lock:
            self._unload_locked()

    def _unload_locked(self) -> None:
        if self._backend is not None:
            self._backend.unload()
        self._backend, self._spec = None, None

    def _require(self) -> Backend:
        if self._backend is None:
            raise NoModelLoaded()
        return self._backend

    # -- text -----------------------------------------------------------------------------------------
    def chat_prompt(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        with self._lock:
            return self._require().chat_prompt(messages, add_generation_prompt)

    def count_tokens(self, text: str) -> int:
        with self._lock:
            return self._require().count_tokens(text)

    def generate(self, prompt: str, params: GenerationParams | None = None,
                 cancel: threading.Event | None = None) -> str:
        """The whole reply at once, cut before the first stop string."""
        params = params or GenerationParams()
        with self._lock:
            text = self._require().generate(prompt, params, cancel)
        return cut_at_stop(text, params.stop)[0]

    def stream(self, prompt: str | list[dict], params: GenerationParams | None = None,
               cancel: threading.Event | None = None) -> Iterator[str]:
        """Text deltas of the reply to a prompt (or to chat messages). The model is held for the caller
        until the iterator ends or is closed; a stop string or `cancel` ends the generation early."""
        params = params or GenerationParams()
        cancel = cancel or threading.Event()
        stops = StopStringFilter(params.stop)
        with self._lock:
            backend = self._require()
            if not isinstance(prompt, str):
                prompt = backend.chat_prompt(prompt)
            chunks = backend.stream(prompt, params, cancel)
            try:
                for delta in chunks:
                    out = stops.feed(delta)
                    if out:
                        yield out
                    if stops.stopped:
                        break
                tail = stops.flush()
                if tail:
                    yield tail
            finally:
                chunks.close()  # stops the backend's worker if we left early

    def stream_chat(self, messages: list[dict], params: GenerationParams | None = None,
                    cancel: threading.Event | None = None) -> Iterator[str]:
        """Stream the assistant's reply to OpenAI-style `messages`, rendered with the chat template."""
        return self.stream(messages, params, cancel)
