"""The Backend protocol: what every loader (transformers, gptq, llamacpp) offers the Engine.

A backend owns one loaded model and knows nothing of the UI, the API or the other backends. The Engine
serializes calls into it (a backend never sees two generations at once unless its capabilities say it
batches). Each backend declares its `Capabilities` so that the UI and API can show only what the loader
can do; operations a loader lacks raise `UnsupportedOperation` with a message meant for the user.
"""
from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from webui.config import GenerationParams, ModelSpec

# progress(fraction in [0, 1] or None when unknown, message)
Progress = Callable[[float | None, str], None]


def no_progress(fraction: float | None, message: str) -> None:
    pass


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says why in plain words (shown to the user as is)."""


class UnsupportedOperation(RuntimeError):
    """The loaded loader cannot do this operation; the message says so and, where possible, what to do."""


@dataclass(frozen=True)
class Capabilities:
    """What a loader can do. `samplers` are the GenerationParams fields it honours; `settings` the
    ModelSpec fields that matter to it (the Model tab shows only those)."""

    loader: str
    samplers: frozenset = frozenset()
    settings: tuple = ()
    adapters: bool = False        # apply PEFT adapters
    adapter_stack: bool = False   # several at once, each with a weight
    merge: bool = False           # merge adapters into the base weights in memory
    mixed_batch: bool = False     # one forward pass for requests with different adapters
    extra: dict = field(default_factory=dict)


@dataclass
class LoadedInfo:
    """Describes the loaded model for status lines and /v1/models."""

    name: str
    path: str
    loader: str
    device: str = "cpu"
    dtype: str = ""
    architecture: str = ""
    parameters: int = 0
    context_length: int = 0


class Backend(ABC):
    """One loaded model on one loader."""

    name: str = "base"
    # the ModelSpec fields that matter to this loader (the Model tab shows only these)
    SETTINGS: tuple = ()

    # -- lifecycle -------------------------------------------------------------------------------
    @classmethod
    def preflight(cls, path: Path, spec: ModelSpec) -> None:
        """Cheap checks that `path` can be loaded (files present, config readable), run while the
        previous model is still loaded. Raise ModelLoadError naming the problem."""

    @abstractmethod
    def load(self, path: Path, spec: ModelSpec, progress: Progress = no_progress) -> LoadedInfo:
        """Load the model; raise ModelLoadError with a readable reason on failure."""

    @abstractmethod
    def unload(self) -> None:
        """Free the model's memory."""

    @property
    @abstractmethod
    def capabilities(self) -> Capabilities: ...

    # -- text --------------------------------------------------------------------------------------
    @abstractmethod
    def chat_prompt(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render OpenAI-style messages with the model's own chat template."""

    @abstractmethod
    def count_tokens(self, text: str) -> int: ...

    @abstractmethod
    def generate(self, prompt: str, params: GenerationParams, cancel: threading.Event | None = None) -> str:
        """Generate the whole continuation of `prompt` (no stop-string handling: the Engine does that)."""

    @abstractmethod
    def stream(self, prompt: str, params: GenerationParams,
               cancel: threading.Event | None = None) -> Iterator[str]:
        """Yield the continuation of `prompt` as text deltas. Closing the iterator early, or setting
        `cancel`, stops the generation and frees the model for the next caller."""

    def stream_batch(self, prompts: list[str], params: GenerationParams, adapter_names: list | None = None,
                     cancel: threading.Event | None = None) -> Iterator[tuple]:
        """Several prompts; events ("delta", row, text) and ("done", row, finish_reason, tokens). This
        default runs them one after another; loaders with capabilities.mixed_batch do one pass and honour
        `adapter_names` (one adapter per row)."""
        if adapter_names and any(adapter_names):  # [None, None, ...] = all plain base: fine only without adapters
            raise UnsupportedOperation(f"the {self.name} loader cannot mix adapters within one batch")
        for row, prompt in enumerate(prompts):
            text = ""
            for delta in self.stream(prompt, params, cancel):
                text += delta
                yield ("delta", row, delta)
            # re-tokenizing the reply approximates its token count (exact for most tokenizers)
            n = self.count_tokens(text) if text else 0
            yield ("done", row, "length" if n >= params.max_new_tokens else "stop", n)

    # -- adapters (loaders without them keep these defaults; capabilities.adapters says which) --------
    def describe_base(self):
        """A webui.adapters.targets.BaseDescription of the loaded model (its adaptable layers and shapes)."""
        raise UnsupportedOperation(f"the {self.name} loader cannot apply LoRA adapters")

    @property
    def adapters_loaded(self) -> dict:
        """Cached adapters: name -> file signature."""
        return {}

    @property
    def active_adapters(self) -> dict:
        """The active stack: name -> weight ({} = the plain base)."""
        return {}

    @property
    def merged(self) -> bool:
        return False

    def load_adapter(self, name: str, files, state: dict, report) -> None:
        """Add a checked adapter to the cache (not activated). `report` lists targets to ignore."""
        raise UnsupportedOperation(f"the {self.name} loader cannot apply LoRA adapters")

    def set_adapters(self, weights: dict[str, float]) -> None:
        """Make exactly these cached adapters active, each with its weight ({} = the plain base)."""
        raise UnsupportedOperation(f"the {self.name} loader cannot apply LoRA adapters")

    def delete_adapter(self, name: str) -> None:
        raise UnsupportedOperation(f"the {self.name} loader cannot apply LoRA adapters")

    def merge_adapters(self) -> None:
        raise UnsupportedOperation(f"the {self.name} loader cannot merge adapters into the base")

    def unmerge_adapters(self) -> None:
        raise UnsupportedOperation(f"the {self.name} loader cannot merge adapters into the base")

    def save_merged(self, out_dir: Path) -> None:
        """Write the base with the active adapters merged in, loadable with no adapter. May consume the
        loaded model (export runs on a private copy)."""
        raise UnsupportedOperation(f"the {self.name} loader cannot export merged models")

    def blend_adapters(self, weights: dict[str, float], new_name: str, combination_type: str, out_dir: Path,
                       density: float | None = None) -> Path:
        raise UnsupportedOperation(f"the {self.name} loader cannot blend adapters")
