"""The one home of LoRA Deck's options: every default, choice, range and help text lives in the
dataclasses below (in the style of PEFT's LoraConfig: fields with ``metadata={"help": ...}`` and
``Literal`` choices, validated in ``__post_init__`` with errors naming the field). The CLI flags, the
preset YAML keys and the UI's labels/sliders are all derived from these definitions, so adding an
option here makes it appear everywhere.
"""
from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

LoaderName = Literal["auto", "transformers", "gptq", "llamacpp"]
DtypeName = Literal["auto", "float32", "bfloat16", "float16"]
DeviceName = Literal["auto", "cpu", "cuda"]


class ConfigError(ValueError):
    """A bad option value; the message names the field and what is allowed."""


def _opt(default, help: str, **meta):
    """A dataclass field carrying its help text and UI hints (min/max/step) in metadata."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **meta})
    return field(default=default, metadata={"help": help, **meta})


def choices_of(cls, name: str) -> tuple | None:
    """The allowed values of a Literal-typed field, else None."""
    hint = typing.get_type_hints(cls)[name]
    if get_origin(hint) is Literal:
        return get_args(hint)
    return None


def _validate(obj) -> None:
    """Check Literal choices and numeric ranges declared in field metadata; raise ConfigError naming the field."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        hint = hints[f.name]
        if get_origin(hint) is Literal and value not in get_args(hint):
            allowed = ", ".join(map(str, get_args(hint)))
            raise ConfigError(f"{f.name}: {value!r} is not one of: {allowed}")
        lo, hi = f.metadata.get("min"), f.metadata.get("max")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if lo is not None and value < lo or hi is not None and value > hi:
                raise ConfigError(f"{f.name}: {value!r} is outside the allowed range [{lo}, {hi}]")


@dataclass
class GenerationParams:
    """Sampling settings for one generation. temperature 0 means greedy decoding."""

    max_new_tokens: int = _opt(256, "Most tokens to generate for one reply.", min=1, max=8192, step=1)
    temperature: float = _opt(0.7, "Randomness: 0 = always the most likely token (greedy); higher = more varied.",
                              min=0.0, max=2.0, step=0.01)
    top_p: float = _opt(0.9, "Nucleus sampling: keep the smallest set of tokens whose probabilities add up to this.",
                        min=0.0, max=1.0, step=0.01)
    top_k: int = _opt(40, "Keep only the k most likely tokens (0 = off).", min=0, max=200, step=1)
    min_p: float = _opt(0.0, "Drop tokens less likely than this fraction of the top token's probability (0 = off).",
                        min=0.0, max=1.0, step=0.01)
    typical_p: float = _opt(1.0, "Locally typical sampling (1 = off).", min=0.0, max=1.0, step=0.01)
    repetition_penalty: float = _opt(1.0, "Penalize tokens already in the context, multiplicatively (1 = off).",
                                     min=1.0, max=2.0, step=0.01)
    presence_penalty: float = _opt(0.0, "Subtract this from the logit of every token already generated (0 = off).",
                                   min=-2.0, max=2.0, step=0.01)
    frequency_penalty: float = _opt(0.0, "Subtract this times the count of each token already generated (0 = off).",
                                    min=-2.0, max=2.0, step=0.01)
    seed: int = _opt(-1, "Random seed for reproducible sampling (-1 = random).", min=-1, max=2**31 - 1, step=1)
    stop: list = _opt([], "Stop strings: generation ends before the first one that appears.")

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop] if self.stop else []
        self.stop = [str(s) for s in (self.stop or [])]
        for name in ("max_new_tokens", "top_k", "seed"):
            v = getattr(self, name)
            if isinstance(v, float) and v.is_integer():
                setattr(self, name, int(v))
            elif not isinstance(getattr(self, name), int) or isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name}: {v!r} is not an integer")
        _validate(self)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict | None) -> "GenerationParams":
        """Build from a mapping (a preset file, a request); unknown keys are an error naming them."""
        data = dict(data or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown generation setting(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**data)


@dataclass
class ModelSpec:
    """What to load and how. `model` is a name in the models dir, or a path; empty = the embedded model."""

    model: str = _opt("", "Model: a folder or .gguf file in the models dir, or a path (empty = embedded SmolLM2).")
    loader: LoaderName = _opt("auto", "Loader: auto picks llamacpp for .gguf, gptq for GPTQ folders, else transformers.")
    dtype: DtypeName = _opt("auto", "Weights dtype on the transformers loader (auto: bfloat16/float16 on CUDA, float32 on CPU).")
    device: DeviceName = _opt("auto", "Device (auto: CUDA when present, else CPU).")
    n_ctx: int = _opt(4096, "Context length (llama.cpp).", min=128, max=1 << 20, step=128)
    n_threads: int = _opt(0, "CPU threads (llama.cpp; 0 = all cores).", min=0, max=512, step=1)
    n_gpu_layers: int = _opt(-1, "Layers offloaded to the GPU when one exists (llama.cpp; -1 = all).", min=-1, max=1000, step=1)

    def __post_init__(self):
        _validate(self)


@dataclass
class ServerConfig:
    """Start-up options of the app (the flags of `python app.py`)."""

    model: str = _opt("", "Model to load at start (a models-dir name or a path; default: the embedded SmolLM2).")
    loader: LoaderName = _opt("auto", "Loader for --model.")
    dtype: DtypeName = _opt("auto", "Weights dtype (transformers loader).")
    lora: list = _opt([], "Adapters (names in the loras dir) to apply at start.")
    lora_weights: list = _opt([], "A weight per --lora adapter (default 1.0 each).")
    models_dir: str = _opt("models", "Folder of base models.")
    loras_dir: str = _opt("loras", "Folder of LoRA adapters.")
    presets_dir: str = _opt("presets", "Folder of generation presets (YAML).")
    user_dir: str = _opt("user_data", "Folder for saved conversations and UI settings.")
    listen_host: str = _opt("127.0.0.1", "Address to bind (default loopback only).")
    port: int = _opt(7860, "Port to serve the UI (/) and the API (/v1) on.", min=1, max=65535)
    auth: str = _opt("", "USER:PASS required to open the web UI.")
    api_key: str = _opt("", "Key required as `Authorization: Bearer KEY` on /v1.")
    nowebui: bool = _opt(False, "Serve the API alone, without the web UI.")
    extensions: list = _opt([], "Extensions (folders in extensions/) to load.")

    def __post_init__(self):
        _validate(self)
        if self.auth and ":" not in self.auth:
            raise ConfigError("auth: expected USER:PASS")
        if self.lora_weights and len(self.lora_weights) != len(self.lora):
            raise ConfigError(f"lora_weights: {len(self.lora_weights)} weight(s) given for {len(self.lora)} adapter(s)")

    def model_spec(self) -> ModelSpec:
        return ModelSpec(model=self.model, loader=self.loader, dtype=self.dtype)

    @property
    def paths(self) -> dict[str, Path]:
        return {"models": Path(self.models_dir), "loras": Path(self.loras_dir), "presets": Path(self.presets_dir),
                "user": Path(self.user_dir)}


_LIST_ITEM_TYPES = {"lora": str, "lora_weights": float, "extensions": str}


def add_arguments(parser: argparse.ArgumentParser, cls) -> None:
    """Add a --flag per dataclass field (underscores become dashes), with its help, choices and default."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kwargs: dict[str, Any] = {"dest": f.name, "help": f.metadata.get("help", ""), "default": default}
        hint = hints[f.name]
        if get_origin(hint) is Literal:
            kwargs["choices"] = get_args(hint)
        elif hint is bool:
            kwargs["action"] = "store_true"
        elif hint is list:
            kwargs.update(nargs="*", type=_LIST_ITEM_TYPES.get(f.name, str))
        else:
            kwargs["type"] = hint
        parser.add_argument(flag, **kwargs)


def from_namespace(cls, ns: argparse.Namespace):
    """Build a dataclass from the parsed flags that add_arguments made."""
    return cls(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(cls) if hasattr(ns, f.name)})
