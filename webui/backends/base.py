"""The Backend protocol: what every loader (transformers, gptq, llamacpp) offers the Engine, and what it
declares about itself for the registry (webui/backends/registry.py): its name, its settings, which model
paths it claims, its optional dependency, how it provides the embedded model and how it trains.

A backend owns one loaded model and knows nothing of the UI, the API or the other backends. It generates only
for the Engine's scheduler (Engine.submit is the one door): through its `decoder()` (a continuous batch), or
`stream_batch` / `stream_tokens` where it has none. The Engine serializes calls into it (a backend never sees
two generations at once unless its capabilities say it batches). Each backend declares its `Capabilities` so that the UI and API can show only what the loader
can do; operations a loader lacks raise `Unsupported` with a message meant for the user.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import threading
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from webui.errors import Unsupported
from webui.options.config import GenerationParams, ModelSpec
from webui.progress import Progress, no_progress

# Every sampling field of GenerationParams; a loader that lacks one declares a smaller set.
SAMPLERS = frozenset(f.name for f in dataclasses.fields(GenerationParams))


@contextmanager
def stack_kept(backend: "Backend"):
    """Whatever the block does to the active adapters (a request's own stack, a scoring pass, a blend), the stack
    active when it started — merged or not — is active again afterwards: the UI's stack is never changed by
    something that merely borrowed the model. Yields that stack."""
    previous, was_merged = backend.active_adapters, backend.merged
    try:
        yield previous
    finally:
        restore_stack(backend, previous, was_merged)


def restore_stack(backend: "Backend", weights: dict, merged: bool) -> None:
    """Make `weights` the active stack again (leaving out adapters no longer cached), merged if it was."""
    loaded = backend.adapters_loaded
    kept = {n: w for n, w in weights.items() if n in loaded}
    if backend.active_adapters != kept:
        backend.set_adapters(kept)
    if merged and kept and not backend.merged:
        backend.merge_adapters()


def incremental_texts(decode, ids: list[int]) -> list[str]:
    """Per-token text pieces that join to `decode(ids)`, for tokenizers whose tokens are not strings on their
    own (byte pieces, sentencepiece's leading-space marks): each token's piece is what decoding it in the
    context of the tokens just before it adds, held back while it ends in a partial character."""
    pieces, prefix, read = [], 0, 0
    for i in range(len(ids)):
        before = decode(ids[prefix:read])
        now = decode(ids[prefix:i + 1])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            pieces.append(now[len(before):])
            prefix, read = read, i + 1
        else:
            pieces.append("")
    if pieces and read < len(ids):  # the sequence ends inside a character
        pieces[-1] += decode(ids[prefix:])[len(decode(ids[prefix:read])):]
    return pieces


def plain_transcript(messages: list[dict], add_generation_prompt: bool = True) -> str:
    """The prompt for a model without a chat template (a base model): a plain transcript, so chat still works."""
    text = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages)
    return text + ("Assistant:" if add_generation_prompt else "")


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
    concurrent: bool = False      # serves many requests at once itself (a remote engine): the scheduler
                                  # hands each request over as it arrives, with its own adapter stack
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class RowDelta:
    """A piece of row `row`'s reply, as `stream_batch` yields it."""

    row: int
    text: str


@dataclass(frozen=True)
class RowDone:
    """Row `row` ended: `reason` "stop" (end of sequence) or "length" (its token budget); `tokens` generated (None
    when the loader cannot tell); `ids` the generated ids when it can, ending with the end-of-sequence token."""

    row: int
    reason: str
    tokens: int | None
    ids: list[int] | None = None


@dataclass
class TokenScores:
    """One scored sequence: `logprobs[i]` = log p(ids[i + 1] | ids[:i + 1]) (so one fewer than the ids: the
    first token has no context), and with top_k, `top[i]` = the k most likely (token id, logprob) there."""

    ids: list[int]
    logprobs: list[float]
    top: list[list[tuple[int, float]]] | None = None


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


class Decoder(ABC):
    """Iteration-level (continuous) batching over one loaded model: rows join between decode steps and leave
    as soon as they are done, each with its own prompt, adapter stack and sampling settings. The scheduler
    drives one Decoder from one thread while it holds the engine's lock; `key` is the scheduler's handle for
    a row. A backend that has one returns it from `Backend.decoder()`."""

    capacity: int = 8  # rows at most

    def __len__(self) -> int:
        """The rows running (prefilling ones included)."""
        return len(self.rows)

    @property
    @abstractmethod
    def rows(self) -> dict:
        """key -> the row's state."""

    @abstractmethod
    def can_join(self, adapters: dict) -> bool:
        """May a row with this adapter stack ({name: weight}; {} = the plain base) join the rows running now?
        (False while it needs a different stack than theirs, for example.) Always True when empty."""

    @abstractmethod
    def add(self, key, ids: list[int], params: GenerationParams, adapters: dict) -> int:
        """Start a row for the prompt `ids`. Returns how many tokens it may generate (max_new_tokens, capped by
        the context); raises BadInput when it cannot run (a prompt longer than the context, an adapter not
        loaded). The prefill may run here or be spread over the next steps (a long prompt does not stall the
        other rows for long)."""

    @abstractmethod
    def step(self) -> list[tuple]:
        """One decode step of every row: (key, token id, text) for each row that produced a token (a row still
        prefilling produces none). The text is what the token adds to the row's reply, holding back an
        incomplete UTF-8 character; an end-of-sequence token adds "" (see `is_end`)."""

    @abstractmethod
    def is_end(self, token: int) -> bool:
        """Is `token` an end of sequence (the row stops on it)?"""

    def flush(self, key) -> str:
        """Text held back for `key` (an incomplete character at the end of the reply); called when it ends."""
        return ""

    @abstractmethod
    def remove(self, key) -> None:
        """Drop a row (finished or cancelled); its memory is free for the next one."""

    def close(self) -> None:
        """Called when the last row has left: put the backend back as the UI left it (active stack, merge)."""


class Backend(ABC):
    """One loaded model on one loader. The class attributes and classmethods below are what the registry
    reads without loading anything."""

    name: str = "base"
    # the ModelSpec fields that matter to this loader (the Model tab, the CLI help and the YAML show these)
    settings: tuple = ()
    # Python modules this loader needs beyond the core dependencies; missing ones make it unavailable
    requires: tuple = ()
    # whether `--loader auto` with no model may pick this loader for the embedded model (False where
    # preparing it takes minutes)
    embedded_by_default: bool = True

    # -- what the registry asks ------------------------------------------------------------------
    @classmethod
    def available(cls) -> bool:
        """Are this loader's optional dependencies installed? (find_spec: nothing is imported)"""
        return all(importlib.util.find_spec(m) is not None for m in cls.requires)

    @classmethod
    def claims(cls, path: Path) -> bool:
        """Is `path` a model in this loader's own format (what `--loader auto` picks it for)?"""
        return False

    @classmethod
    def claims_address(cls, model: str) -> bool:
        """Is the model string, as the user typed it, an address this loader serves rather than a file (a
        remote engine's URL)? Checked before the string is looked up as a path."""
        return False

    @classmethod
    def embedded(cls, models_dir: Path, progress: Progress | None = None) -> Path | None:
        """The embedded default model in the form this loader reads (prepared once, then reused), or None."""
        return None

    @classmethod
    def training_model(cls, path: Path, device: str, dtype, quantization: str = "none"):
        """A model of `path` to train a LoRA on with PEFT (this loader's form of QLoRA where the weights are
        quantized; `quantization`: bitsandbytes nf4/fp4/int8 while loading, or none). Loaders that cannot train,
        or cannot quantize that way, refuse."""
        raise Unsupported(f"the {cls.name} loader cannot train adapters; train on the model's transformers folder")

    @classmethod
    def training_lora_config(cls, lora_config, model):
        """PEFT's LoraConfig adjusted to this loader's layers (e.g. naming quantized layers for all-linear)."""
        return lora_config

    # -- lifecycle -------------------------------------------------------------------------------
    @classmethod
    def preflight(cls, path: Path, spec: ModelSpec) -> None:
        """Cheap checks that `path` can be loaded (files present, config readable), run while the
        previous model is still loaded. Raise LoadFailed naming the problem."""

    @classmethod
    def memory_need(cls, path: Path, spec: ModelSpec) -> int:
        """Bytes of RAM loading `path` with `spec` will hold (webui/backends/machine.py), 0 when not estimated
        (GPU memory, a remote engine). The Engine refuses a load that needs more than is free."""
        return 0

    def memory_held(self) -> int:
        """Bytes of RAM this loaded model holds, which unloading it frees (0 when not known)."""
        return 0

    @abstractmethod
    def load(self, path: Path, spec: ModelSpec, progress: Progress = no_progress) -> LoadedInfo:
        """Load the model; raise LoadFailed with a readable reason on failure."""

    @abstractmethod
    def unload(self) -> None:
        """Free the model's memory."""

    @property
    @abstractmethod
    def capabilities(self) -> Capabilities: ...

    def engine_status(self, ours: dict | None = None) -> dict | None:
        """A serving engine's own description for the Model tab (engine, url, base, context_length, and which of
        `ours` — our adapter name -> folder — it can serve); None for a model loaded in this process."""
        return None

    # -- text --------------------------------------------------------------------------------------
    @abstractmethod
    def chat_prompt(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render OpenAI-style messages with the model's own chat template."""

    @abstractmethod
    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        """Token ids of `text`. With `add_special`, the model's BOS is added as generation adds it (not twice
        when the text already starts with it, as a chat-template prompt does)."""

    @abstractmethod
    def token_texts(self, ids: list[int]) -> list[str]:
        """The text each token adds to the sequence's text: joined, they are `detokenize(ids)`. A token that
        holds only part of a character adds "" and the token that completes it adds the whole character (how
        streaming servers report tokens)."""

    def is_end_of_sequence(self, token: int) -> bool:
        """Does generating `token` end the reply (any of the model's end tokens, not just the main one)?"""
        return token == self.eos_token_id

    @property
    def eos_token_id(self) -> int | None:
        """The end-of-sequence token (raw training text ends with it), or None when the model has none."""
        return None

    @abstractmethod
    def detokenize(self, ids: list[int]) -> str:
        """The text of a token sequence (special tokens included, as the ids say)."""

    def count_tokens(self, text: str) -> int:
        return len(self.tokenize(text))

    @abstractmethod
    def score(self, sequences: list[list[int]], top_k: int = 0) -> list["TokenScores"]:
        """Log-probabilities of each token of each sequence given the tokens before it, under the loaded model
        with its active adapters (one forward pass, no sampling): what loss, perplexity, `echo` and prompt
        logprobs are made of. `top_k` > 0 also returns the k most likely tokens at each position."""

    def prepare_response_format(self, response_format: str) -> None:
        """Check (and compile, once) a GenerationParams.response_format before requests that use it are queued,
        so a schema this loader cannot enforce is refused up front."""
        if response_format:
            raise Unsupported(f"the {self.name} loader cannot enforce a response format")

    def decoder(self) -> Decoder | None:
        """A continuous batch over this model (see Decoder), or None where the loader has none (then the
        scheduler uses `stream_batch`)."""
        return None

    def stream_batch(self, prompts: list[str], params: GenerationParams, adapter_names: list | None = None,
                     cancel: threading.Event | None = None) -> Iterator[RowDelta | RowDone]:
        """Several prompts; events RowDelta (a piece of a row's reply) and, once per row, RowDone. This default
        runs them one after another through `stream_tokens`; loaders with capabilities.concurrent (a remote
        engine) run them at once and take a row's whole {name: weight} stack as its `adapter_names` entry."""
        if adapter_names and any(adapter_names):  # [None, None, ...] = all plain base: fine only without adapters
            raise Unsupported(f"the {self.name} loader cannot mix adapters within one batch")
        for row, prompt in enumerate(prompts):
            text, ids = "", []
            for delta, delta_ids in self.stream_tokens(prompt, params, cancel):
                text += delta
                ids = None if delta_ids is None or ids is None else ids + delta_ids
                if delta:
                    yield RowDelta(row, delta)
            eos = bool(ids) and self.is_end_of_sequence(ids[-1])
            # without ids, re-tokenizing the reply approximates its token count (exact for most tokenizers)
            n = len(ids) - eos if ids is not None else self.count_tokens(text) if text else 0
            yield RowDone(row, "length" if n >= params.max_new_tokens else "stop", n, ids)

    def stream_tokens(self, prompt: str, params: GenerationParams,
                      cancel: threading.Event | None = None) -> Iterator[tuple[str, list[int] | None]]:
        """One request alone, for loaders without a decoder and without a `stream_batch` of their own: text
        deltas with the token ids behind each ((text, ids); ids None when the loader cannot tell), the last
        ids ending with the end-of-sequence token the reply stopped on. Closing the iterator early, or setting
        `cancel`, stops the generation."""
        raise Unsupported(f"the {self.name} loader cannot generate")

    # -- adapters (loaders without them keep these defaults; capabilities.adapters says which) --------
    def describe_base(self):
        """A webui.adapters.targets.BaseDescription of the loaded model (its adaptable layers and shapes)."""
        raise Unsupported(f"the {self.name} loader cannot apply LoRA adapters")

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
        raise Unsupported(f"the {self.name} loader cannot apply LoRA adapters")

    def set_adapters(self, weights: dict[str, float]) -> None:
        """Make exactly these cached adapters active, each with its weight ({} = the plain base)."""
        raise Unsupported(f"the {self.name} loader cannot apply LoRA adapters")

    def delete_adapter(self, name: str) -> None:
        raise Unsupported(f"the {self.name} loader cannot apply LoRA adapters")

    def merge_adapters(self) -> None:
        raise Unsupported(f"the {self.name} loader cannot merge adapters into the base")

    def unmerge_adapters(self) -> None:
        raise Unsupported(f"the {self.name} loader cannot merge adapters into the base")

    def save_merged(self, out_dir: Path) -> None:
        """Write the base with the active adapters merged in, loadable with no adapter. May consume the
        loaded model (export runs on a private copy)."""
        raise Unsupported(f"the {self.name} loader cannot export merged models")

    def blend_adapters(self, weights: dict[str, float], new_name: str, combination_type: str, out_dir: Path,
                       density: float | None = None, **options) -> Path:
        raise Unsupported(f"the {self.name} loader cannot blend adapters")
