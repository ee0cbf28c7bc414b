"""The one home of LoRA Deck's options: every default, choice, range and help text lives in the
dataclasses below (in the style of PEFT's LoraConfig: fields with ``metadata={"help": ...}`` and
``Literal`` choices, validated in ``__post_init__`` with errors naming the field). The CLI flags, the
preset YAML keys and the UI's labels/sliders are all derived from these definitions, so adding an
option here makes it appear everywhere.
"""
from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args, get_origin

from webui.errors import BadInput

# The loaders by key, as the options name them; webui/backends/registry.py maps each key to its Backend class
# (and checks, when it is imported, that the two lists agree). Options never import the registry: the loaders
# depend on the options, not the reverse.
LoaderName = Literal["auto", "llamacpp", "gptq", "transformers", "remote", "vllm", "llama-server"]
DtypeName = Literal["auto", "float32", "bfloat16", "float16"]
DeviceName = Literal["auto", "cpu", "cuda"]
QuantizationName = Literal["none", "nf4", "fp4", "int8"]
_QUANTIZATION_HELP = ("bitsandbytes quantization while loading (transformers loader): nf4 (4-bit NormalFloat, "
                      "QLoRA's choice), fp4 (4-bit float), int8 (LLM.int8); none = the weights as saved.")

DatasetFormat = Literal["raw", "instruction", "chat", "preference"]  # training's and evaluation's dataset formats

RemoteEngineName = Literal["auto", "vllm", "sglang", "lorax", "llama-server", "loradeck", "openai"]
_REMOTE_ENGINE_HELP = ("Which serving engine is at the remote URL (auto: detected from the routes it answers): vLLM, "
                       "SGLang, LoRAX, llama.cpp's llama-server, another LoRA Deck, or any OpenAI-compatible server.")


def _opt(default, help: str, **meta):
    """A dataclass field carrying its help text and UI hints (min/max/step) in metadata."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **meta})
    return field(default=default, metadata={"help": help, **meta})


def choices_of(cls, name: str) -> tuple | None:
    """The allowed values of a field: its Literal's, or those its metadata names (a callable, for choices
    known only at run time such as the registered loaders); None when any value goes."""
    hint = typing.get_type_hints(cls)[name]
    if get_origin(hint) is Literal:
        return get_args(hint)
    choices = cls.__dataclass_fields__[name].metadata.get("choices")
    return tuple(choices()) if callable(choices) else choices


def _validate(obj) -> None:
    """Check choices and numeric ranges declared on the fields; raise BadInput naming the field."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):  # a composed options object checks itself when it is made
            continue
        allowed = choices_of(type(obj), f.name)
        if allowed is not None and value not in allowed:
            raise BadInput(f"{f.name}: {value!r} is not one of: {', '.join(map(str, allowed))}")
        lo, hi = f.metadata.get("min"), f.metadata.get("max")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if value != value:
                raise BadInput(f"{f.name}: NaN is not a number")
            if lo is not None and value < lo or hi is not None and value > hi:
                raise BadInput(f"{f.name}: {value!r} is outside the allowed range [{lo}, {hi}]")


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
    response_format: str = _opt("", "Structured output: `json` for any JSON object, or a JSON schema the reply must "
                                    "follow (enforced token by token); empty = free text.")

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop] if self.stop else []
        self.stop = [str(s) for s in (self.stop or [])]
        self.response_format = (self.response_format or "").strip()
        if self.response_format not in ("", "json"):
            try:
                schema = json.loads(self.response_format)
            except ValueError as e:
                raise BadInput(f"response_format: not `json` and not a JSON schema ({e})") from None
            if not isinstance(schema, dict):
                raise BadInput("response_format: a JSON schema must be a JSON object")
        for name in ("max_new_tokens", "top_k", "seed"):
            v = getattr(self, name)
            if isinstance(v, float) and v.is_integer():
                setattr(self, name, int(v))
            elif not isinstance(getattr(self, name), int) or isinstance(getattr(self, name), bool):
                raise BadInput(f"{name}: {v!r} is not an integer")
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
            raise BadInput(f"unknown generation setting(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**data)


@dataclass
class ModelSpec:
    """What to load and how. `model` is a name in the models dir, or a path; empty = the embedded model."""

    model: str = _opt("", "Model: a folder or .gguf file in the models dir, or a path (empty = embedded SmolLM2).")
    loader: LoaderName = _opt("auto", "Loader: auto picks llamacpp for .gguf, gptq for GPTQ folders, else transformers; "
                                      "remote drives an engine at a URL; vllm and llama-server run that engine here.")
    dtype: DtypeName = _opt("auto", "Weights dtype on the transformers loader (auto: bfloat16/float16 on CUDA, float32 on CPU).")
    device: DeviceName = _opt("auto", "Device (auto: CUDA when present, else CPU).")
    n_ctx: int = _opt(4096, "Context length (llama.cpp, llama-server; vLLM's --max-model-len, within the model's).", min=128, max=1 << 20, step=128)
    n_threads: int = _opt(0, "CPU threads (llama.cpp; 0 = all cores).", min=0, max=512, step=1)
    n_gpu_layers: int = _opt(-1, "Layers offloaded to the GPU when one exists (llama.cpp; -1 = all).", min=-1, max=1000, step=1)
    # loader_option: a loader whose `settings` lack it refuses a non-default value (and `auto` skips that loader)
    quantization: QuantizationName = _opt("none", _QUANTIZATION_HELP, loader_option=True)
    # the remote loader (--loader remote --model URL): a serving engine driven over HTTP
    remote_engine: RemoteEngineName = _opt("auto", _REMOTE_ENGINE_HELP, loader_option=True)
    remote_api_key: str = _opt("", "API key the remote engine wants (sent as Authorization: Bearer KEY).",
                               loader_option=True, secret=True)
    remote_adapter_root: str = _opt("", "Where the remote engine sees our adapters folder (shared storage): "
                                        "loras/NAME is given to it as ROOT/NAME (vLLM, SGLang, LoRAX). "
                                        "Empty = the same paths as here.", loader_option=True)
    remote_timeout: float = _opt(120.0, "Seconds to wait for the remote engine to answer (and between streamed "
                                        "tokens) before giving up with an error.", min=1.0, max=3600.0, step=1,
                                 loader_option=True)
    # the managed engines (--loader vllm / llama-server): LoRA Deck runs the engine itself on the model
    engine_command: str = _opt("", "The engine program the vllm / llama-server loader runs: a Python that has vLLM "
                                   "installed (its venv's bin/python), or the llama-server binary. Empty = the one "
                                   "scripts/install-vllm.sh or scripts/build-llama-server.sh cached, else PATH.",
                               loader_option=True)
    engine_args: str = _opt("", "Extra command-line arguments for the managed engine, e.g. "
                                "--engine-args='--gpu-memory-utilization 0.8' (with '=': the value starts with "
                                "dashes); they come last, so they override LoRA Deck's.",
                            loader_option=True)
    engine_max_loras: int = _opt(8, "Adapter registrations the managed vLLM has room for per start (blended stacks "
                                    "count; it starts with --max-loras one above, the last slot kept empty: see "
                                    "docs/remote-engines.md). Loading the model again frees them all.",
                                 min=1, max=64, step=1, loader_option=True)

    def __post_init__(self):
        _validate(self)


@dataclass
class ServerConfig:
    """Start-up options of the app (the flags of `python app.py`): what to load first (a ModelSpec, whose fields
    are flags of their own: --model, --loader, --dtype, ...) and how to serve it."""

    spec: ModelSpec = field(default_factory=ModelSpec, metadata={"help": "The model to load at start."})
    lora: list = _opt([], "Adapters (names in the loras dir) to apply at start.")
    lora_weights: list = _opt([], "A weight per --lora adapter (default 1.0 each).")
    models_dir: str = _opt("models", "Folder of base models.")
    loras_dir: str = _opt("loras", "Folder of LoRA adapters.")
    presets_dir: str = _opt("presets", "Folder of generation presets (YAML).")
    user_dir: str = _opt("user_data", "Folder for saved conversations and UI settings.")
    runs_dir: str = _opt("runs", "Folder of training runs (checkpoints, metrics).")
    listen_host: str = _opt("127.0.0.1", "Address to bind (default loopback only).")
    port: int = _opt(7860, "Port to serve the UI (/) and the API (/v1) on.", min=1, max=65535)
    auth: str = _opt("", "USER:PASS required to open the web UI.")
    api_key: str = _opt("", "Key required as `Authorization: Bearer KEY` on every API route (/health stays open).")
    max_request_mb: float = _opt(8.0, "Largest API request body in MB (a larger one is refused with 413).",
                                 min=0.001, max=4096.0)
    nowebui: bool = _opt(False, "Serve the API alone, without the web UI.")
    extensions: list = _opt([], "Extensions (folders in extensions/) to load.")
    extensions_dir: str = _opt("extensions", "Folder of extensions (extensions/NAME/script.py).")

    def __post_init__(self):
        _validate(self)
        if self.auth and ":" not in self.auth:
            raise BadInput("auth: expected USER:PASS")
        if self.lora_weights and len(self.lora_weights) != len(self.lora):
            raise BadInput(f"lora_weights: {len(self.lora_weights)} weight(s) given for {len(self.lora)} adapter(s)")

    @property
    def paths(self) -> dict[str, Path]:
        return {"models": Path(self.models_dir), "loras": Path(self.loras_dir), "presets": Path(self.presets_dir),
                "user": Path(self.user_dir), "runs": Path(self.runs_dir)}


# -- evaluation (python -m webui eval; the Evaluate tab) ----------------------------------------------------

PromptFormat = Literal["auto", "chat", "raw"]


def parse_stack(text: str) -> dict[str, float]:
    """`A=1,B=0.5` → {"A": 1.0, "B": 0.5}; a name without `=W` has weight 1."""
    stack: dict[str, float] = {}
    for part in str(text).replace(";", ",").split(","):
        name, _, weight = part.strip().partition("=")
        name = name.strip()
        if not name:
            continue
        try:
            w = float(weight) if weight.strip() else 1.0
        except ValueError:
            raise BadInput(f"stack: {part.strip()!r}: the weight must be a number (A=1,B=0.5)") from None
        if w != w or w in (float("inf"), float("-inf")):
            raise BadInput(f"stack: {part.strip()!r}: the weight must be a finite number")
        stack[name] = w
    if not stack:
        raise BadInput(f"stack: {text!r} names no adapter (write A=1,B=0.5)")
    return stack


@dataclass
class EvalConfig:
    """One evaluation: the base and each adapter or weighted stack scored on one dataset (training's formats
    and loss masking), and optional prompts answered side by side. The model itself is a ModelSpec."""

    dataset: str = _opt("", "The dataset: a .txt file (raw), or .json/.jsonl (instruction or chat), as for "
                            "training.", required=True)
    format: DatasetFormat = _opt("raw", "raw text, instruction (instruction/input/output), chat (messages / "
                                        "ShareGPT), or preference (prompt/chosen/rejected pairs: each target's "
                                        "log-probability margin of chosen over rejected and its win rate).",
                                 required=True)
    out: str = _opt("", "The report: REPORT.json, or REPORT.html (a self-contained page; the JSON is written "
                        "beside it).", required=True)
    lora: list = _opt([], "Adapters (names in the loras dir) to evaluate, each on its own at weight 1.")
    stack: list = _opt([], "Weighted stacks to evaluate, each written A=W,B=W.")
    prompts: str = _opt("", "Prompts answered by the base and each adapter side by side (greedy): a .txt file with "
                            "one prompt per line, or a .json/.jsonl list of strings.")
    max_samples: int = _opt(0, "Score only the first N samples (0 = all).", min=0, max=10_000_000, step=1)
    max_new_tokens: int = _opt(64, "Longest answer to each prompt.", min=1, max=8192, step=1)
    cutoff_len: int = _opt(256, "Longest sample in tokens, as in training: raw text is cut into chunks of this length "
                                "and longer records are cut short (0 = no cut; raw text in chunks of the context).",
                           min=0, max=131072, step=8)
    overlap: int = _opt(0, "Raw text: tokens shared by consecutive chunks (they are scored in both).",
                        min=0, max=4096, step=1)
    prompt_format: PromptFormat = _opt("auto", "Prompts as chat (a user message in the chat template) or raw "
                                               "(text to continue); auto: chat for instruction/chat data, else raw.")
    batch_size: int = _opt(8, "Samples scored in one forward pass.", min=1, max=1024, step=1)
    bootstrap: int = _opt(1000, "Bootstrap resamples for the 95% interval of each difference to the base.",
                          min=100, max=100_000, step=100)
    seed: int = _opt(0, "Seed of the bootstrap (the same seed gives the same interval).", min=0, max=2**31 - 1, step=1)
    sweep: list = _opt([], "Strength sweeps, each A=S1,S2,...: adapter A (or a stack given with --stack, written the "
                           "same way) scored at each scale, in one run (0 is the base, 1 the adapter as it is).")
    general: bool = _opt(True, "Also score every target on a built-in sample of general English text (public domain), "
                               "so an adapter that damages the base's general ability shows it.")
    models_dir: str = _opt("models", "Folder of base models.")
    loras_dir: str = _opt("loras", "Folder of LoRA adapters.")

    def __post_init__(self):
        _validate(self)
        for name in ("max_samples", "max_new_tokens", "cutoff_len", "overlap", "batch_size", "bootstrap", "seed"):
            v = getattr(self, name)
            if isinstance(v, float) and v.is_integer():
                setattr(self, name, int(v))
            elif isinstance(v, bool) or not isinstance(v, int):
                raise BadInput(f"{name}: {v!r} must be an integer")
        if not self.dataset:
            raise BadInput("dataset: give the dataset file")
        if Path(self.out).suffix.lower() not in (".json", ".html"):
            raise BadInput(f"out: {self.out!r} must end in .json or .html")
        self.lora = [str(n) for n in self.lora or []]
        self.stack = [str(s) for s in self.stack or [] if str(s).strip()]
        for text in self.stack:
            parse_stack(text)
        self.sweep = [str(t) for t in self.sweep or [] if str(t).strip()]
        self.sweeps()

    def sweeps(self) -> list[tuple[str, dict[str, float], list[float]]]:
        """(target, its stack at scale 1, scales) of each `sweep` entry `TARGET=S1,S2,...` (the scales follow the
        last `=`, so a target may be a stack written A=1,B=0.5)."""
        stacks = dict(self.configurations())
        out = []
        for text in self.sweep:
            target, eq, scales = text.rpartition("=")
            target = target.strip()
            if not eq or not target:
                raise BadInput(f"sweep: {text!r} must be TARGET=S1,S2,... (e.g. pirate=0,0.5,1)")
            try:
                values = [float(v) for v in scales.split(",") if v.strip()]
            except ValueError:
                raise BadInput(f"sweep: {text!r}: the scales must be numbers separated by commas") from None
            if not values or any(v != v or abs(v) == float("inf") for v in values):
                raise BadInput(f"sweep: {text!r}: give at least one finite scale")
            stack = stacks.get(target)
            if stack is None:
                stack = parse_stack(target) if "=" in target else {target: 1.0}
            out.append((target, stack, list(dict.fromkeys(values))))
        return out

    def configurations(self) -> list[tuple[str, dict[str, float]]]:
        """(name, stack) of everything evaluated: the base first, then each adapter, then each stack."""
        out = [("base", {})]
        for name in dict.fromkeys(self.lora):
            out.append((name, {name: 1.0}))
        for text in self.stack:
            stack = parse_stack(text)
            name = ",".join(f"{n}={w:g}" for n, w in stack.items())
            if name not in (n for n, _ in out):
                out.append((name, stack))
        return out
