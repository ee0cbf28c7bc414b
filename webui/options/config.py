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
from webui.options import lora_options

# The loaders by key, as the options name them; webui/backends/registry.py maps each key to its Backend class
# (and checks, when it is imported, that the two lists agree). Options never import the registry: the loaders
# depend on the options, not the reverse.
LoaderName = Literal["auto", "llamacpp", "gptq", "transformers", "remote"]
DtypeName = Literal["auto", "float32", "bfloat16", "float16"]
DeviceName = Literal["auto", "cpu", "cuda"]
QuantizationName = Literal["none", "nf4", "fp4", "int8"]
_QUANTIZATION_HELP = ("bitsandbytes quantization while loading (transformers loader): nf4 (4-bit NormalFloat, "
                      "QLoRA's choice), fp4 (4-bit float), int8 (LLM.int8); none = the weights as saved.")

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
    loader: LoaderName = _opt("auto", "Loader: auto picks llamacpp for .gguf, gptq for GPTQ folders, else transformers.")
    dtype: DtypeName = _opt("auto", "Weights dtype on the transformers loader (auto: bfloat16/float16 on CUDA, float32 on CPU).")
    device: DeviceName = _opt("auto", "Device (auto: CUDA when present, else CPU).")
    n_ctx: int = _opt(4096, "Context length (llama.cpp).", min=128, max=1 << 20, step=128)
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


# -- training (python -m webui train --config FILE.yaml; the Training tab) -------------------------------

TaskType = Literal["CAUSAL_LM", "SEQ_2_SEQ_LM"]
BiasName = Literal["none", "all", "lora_only"]
DatasetFormat = Literal["raw", "instruction", "chat", "preference"]
MethodName = Literal["sft", "dpo", "orpo", "kto"]
_METHOD_HELP = ("What the adapter learns from: sft = the replies in the data (supervised fine-tuning); dpo, orpo = "
                "pairs of a better and a worse reply (dataset.format preference; DPO against the base, ORPO without "
                "a reference); kto = replies rated good or bad one by one (pairs count as one of each).")
Scheduler = Literal["linear", "cosine", "constant", "constant_with_warmup"]
# Trainer optimizers that need nothing beyond our dependencies; the 8-bit and paged ones are bitsandbytes'
PrecisionName = Literal["auto", "fp32", "bf16", "fp16"]
Optimizer = Literal["adamw_torch", "adamw_torch_fused", "adafactor", "sgd", "adamw_8bit", "paged_adamw_8bit",
                    "paged_adamw_32bit"]


def _nested(cls, section: str, data) -> object:
    """Build dataclass `cls` from the YAML mapping of `section`; unknown keys are named in the error."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise BadInput(f"{section}: expected a mapping of keys, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise BadInput(f"{section}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(known))}")
    try:
        return cls(**data)
    except BadInput as e:
        raise BadInput(f"{section}.{e}") from None


@dataclass
class LoraTrainConfig:
    """The `lora:` section: the keys of PEFT's LoraConfig that LoRA training guides use, plus bias, use_rslora,
    use_dora."""

    task_type: TaskType = _opt("CAUSAL_LM", "Decoder-only models: CAUSAL_LM; encoder-decoder: SEQ_2_SEQ_LM.")
    r: int = _opt(8, "Rank of the LoRA matrices (capacity of the adapter).", min=1, max=1024, step=1)
    lora_alpha: float = _opt(16, "Scaling: the update is multiplied by lora_alpha / r.", min=0.001, max=4096, step=1)
    lora_dropout: float = _opt(0.05, "Dropout on the LoRA input during training.", min=0.0, max=0.9, step=0.01)
    bias: BiasName = _opt("none", "Which biases to train: none, all, or lora_only.")
    target_modules: list | str = _opt("all-linear", "Layers to adapt: a list of names (q_proj, v_proj, ...) or all-linear.")
    fan_in_fan_out: bool = _opt(False, "True for layers storing weights as (fan_in, fan_out), e.g. GPT-2's Conv1D.")
    modules_to_save: list | None = _opt(None, "Extra modules trained fully and saved with the adapter (e.g. lm_head).")
    layers_to_transform: list | int | None = _opt(None, "Only these layer indices get LoRA (an int or a list).")
    layers_pattern: str | list | None = _opt(
        None, "With layers_to_transform: the name of the layer list (layers, h). Alone (seed 002's form): a regular "
              "expression over module names, e.g. transformer\\.h\\.\\d+\\.attn: LoRA on the targets inside them.")
    use_rslora: bool = _opt(False, "Rank-stabilized LoRA: scale by lora_alpha / sqrt(r).")
    use_dora: bool = _opt(False, "Weight-decomposed LoRA (DoRA).")
    init_lora_weights: bool | str = _opt(
        True, "How the adapter starts (PEFT): true = B zero, A Kaiming (no change until trained); gaussian; "
              "orthogonal; pissa / pissa_niter_N (N fast-SVD iterations) / olora start from the base's principal "
              "directions (faster convergence; the saved adapter is converted to work on the original base, at twice "
              "the rank); false = random A and B (debugging).")

    def __post_init__(self):
        _validate(self)
        self.init_lora_weights = lora_options.init_lora_weights(self.init_lora_weights)
        if isinstance(self.r, bool) or not isinstance(self.r, int):
            raise BadInput(f"r: {self.r!r} must be a positive integer")
        if isinstance(self.target_modules, str) and self.target_modules != "all-linear":
            self.target_modules = [self.target_modules]
        if isinstance(self.target_modules, list) and (not self.target_modules or
                                                      not all(isinstance(t, str) for t in self.target_modules)):
            raise BadInput("target_modules: a non-empty list of module names, or all-linear")
        lt = self.layers_to_transform
        if lt is not None and not (isinstance(lt, int) and not isinstance(lt, bool) and lt >= 0
                                   or isinstance(lt, list) and lt and all(isinstance(i, int) and i >= 0 for i in lt)):
            raise BadInput(f"layers_to_transform: {lt!r} must be a layer index or a list of indices")
        if self.layers_pattern is not None and lt is None:  # seed 002's regex over module names
            lora_options.check_layers_regex(self.layers_pattern)
        for name in ("fan_in_fan_out", "use_rslora", "use_dora"):
            if not isinstance(getattr(self, name), bool):
                raise BadInput(f"{name}: {getattr(self, name)!r} must be true or false")

    @property
    def rewrites_base(self) -> bool:
        """Does this init change the base weights (PiSSA, OLoRA), so the adapter must be converted when saved?"""
        return lora_options.rewrites_base(self.init_lora_weights)

    def peft_config(self, **overrides):
        """PEFT's LoraConfig; `overrides` replace fields (the trainer's PEFT form of a layers_pattern regex)."""
        from peft import LoraConfig  # imports torch: every command reads this module, few train

        kwargs = {**dataclasses.asdict(self), **overrides}
        try:
            return LoraConfig(**kwargs)
        except (ValueError, TypeError) as e:
            raise BadInput(f"lora: PEFT refused these settings: {e}") from None


@dataclass
class DatasetConfig:
    """The `dataset:` section."""

    path: str | list = _opt("", "A .txt file (raw), or .json/.jsonl (instruction or chat); or a list of such files "
                                 "in the same format, mixed into one run.")
    format: DatasetFormat = _opt("raw", "raw text, instruction (instruction/input/output), chat (messages / ShareGPT) "
                                        "or preference (TRL's prompt/chosen/rejected pairs and prompt/completion/label "
                                        "ratings, for method dpo, orpo, kto).")
    eval_fraction: float = _opt(0.1, "Share of samples held out for evaluation (0 = none).", min=0.0, max=0.5, step=0.01)
    overlap: int = _opt(32, "Raw text: tokens shared by consecutive chunks.", min=0, max=4096, step=1)
    train_on_prompt: bool = _opt(False, "instruction/chat: train on the prompt tokens too (every token of the "
                                        "conversation), not only on the replies. Raw text always trains on all.")

    def __post_init__(self):
        _validate(self)
        if not isinstance(self.train_on_prompt, bool):
            raise BadInput(f"train_on_prompt: {self.train_on_prompt!r} must be true or false")
        if isinstance(self.path, list) and len(self.path) == 1:
            self.path = self.path[0]
        if not self.path or isinstance(self.path, list) and not all(isinstance(p, str) and p for p in self.path):
            raise BadInput("path: give the dataset file (or a list of files)")

    @property
    def paths(self) -> list[str]:
        return list(self.path) if isinstance(self.path, list) else [self.path]


@dataclass
class TrainingParams:
    """The `training:` section."""

    epochs: float = _opt(3.0, "Passes over the data (ignored when max_steps > 0).", min=0.0, max=1000, step=0.5)
    max_steps: int = _opt(0, "Stop after this many optimizer steps (0 = use epochs).", min=0, max=10_000_000, step=1)
    learning_rate: float = _opt(2e-4, "Peak learning rate.", min=0.0, max=1.0, step=1e-5)
    batch_size: int = _opt(4, "Samples per device step.", min=1, max=4096, step=1)
    gradient_accumulation: int = _opt(1, "Steps accumulated per optimizer step.", min=1, max=4096, step=1)
    cutoff_len: int = _opt(256, "Longest sample in tokens; raw text is chunked to this length.", min=8, max=131072, step=8)
    save_steps: int = _opt(50, "Save a checkpoint every this many steps.", min=1, max=1_000_000, step=1)
    eval_steps: int = _opt(50, "Evaluate every this many steps (when there is an eval split).", min=1, max=1_000_000)
    logging_steps: int = _opt(1, "Log loss every this many steps.", min=1, max=10_000, step=1)
    warmup_steps: int = _opt(0, "Linear warm-up steps.", min=0, max=1_000_000, step=1)
    warmup_ratio: float = _opt(0.0, "Linear warm-up over this share of all steps (0.03-0.1 is usual; 0 = use "
                                    "warmup_steps). Set this or warmup_steps, not both.", min=0.0, max=0.5, step=0.01)
    lr_scheduler: Scheduler = _opt("linear", "Learning-rate schedule.")
    seed: int = _opt(42, "Random seed.", min=0, max=2**31 - 1, step=1)
    quantization: QuantizationName = _opt(
        "none", "QLoRA: train on the base quantized by bitsandbytes while loading (nf4 is QLoRA's choice; fp4, "
                "int8); the adapter works on the float base too. none = the base as saved (GPTQ: QLoRA anyway).")
    gradient_checkpointing: bool = _opt(True, "Recompute layers' activations in the backward pass instead of keeping "
                                              "them: less memory, more compute (non-reentrant, so the adapter gets "
                                              "its gradients). Off: fastest, most memory.")
    checkpoint_every: int = _opt(2, "With gradient checkpointing: recompute every Nth layer (transformers' "
                                    "every_n_layers). 1: all of them (least memory, TRL's default); 2: half of them "
                                    "(about half the recompute, more memory).", min=1, max=1000, step=1)
    optim: Optimizer = _opt("adamw_torch", "Optimizer (transformers' names); adamw_8bit and paged_* are bitsandbytes' "
                                           "8-bit / paged optimizers, which save GPU memory.")
    weight_decay: float = _opt(0.0, "AdamW weight decay on the adapter weights.", min=0.0, max=1.0, step=0.01)
    max_grad_norm: float = _opt(1.0, "Clip the gradient norm to this (0 = no clipping).", min=0.0, max=1000.0,
                                step=0.1)
    loraplus_lr_ratio: float = _opt(0.0, "LoRA+: the B matrices learn this many times faster than A (PEFT's "
                                         "create_loraplus_optimizer; the paper uses 16; 0 = off).",
                                    min=0.0, max=1000.0, step=1)
    neftune_noise_alpha: float = _opt(0.0, "NEFTune: noise added to the input embeddings while training (5 is "
                                           "the paper's choice; 0 = off).", min=0.0, max=100.0, step=1)
    num_processes: int = _opt(1, "Train in this many processes through Accelerate (DDP): one per GPU; on CPU they "
                                 "share the cores. batch_size is per process.", min=1, max=1024, step=1)
    packing: bool = _opt(False, "Padding-free packing: the samples of a batch share one row with no padding (position "
                                "ids restart per sample, so no sample attends to another); fewer wasted tokens when "
                                "lengths vary. Not for models without position ids (Bloom).")
    beta: float = _opt(0.1, "Preference methods: DPO's and KTO's beta (how far the adapter may move from the base: "
                            "higher stays closer), ORPO's weight of the odds-ratio term (its lambda).",
                       min=0.001, max=100.0, step=0.01)
    precision: PrecisionName = _opt("auto", "Mixed precision. auto: bf16 where the hardware computes it (GPUs from "
                                            "Ampere on, CPUs with AVX512-BF16 or AMX), fp16 on older GPUs, fp32 on "
                                            "other CPUs. fp16 needs a GPU.")

    def __post_init__(self):
        _validate(self)
        for name in ("gradient_checkpointing", "packing"):
            if not isinstance(getattr(self, name), bool):
                raise BadInput(f"{name}: {getattr(self, name)!r} must be true or false")
        if self.warmup_ratio and self.warmup_steps:
            raise BadInput(f"warmup_ratio: warmup_steps is {self.warmup_steps} and warmup_ratio {self.warmup_ratio}; "
                           "set one of them (the other to 0)")
        for name in ("max_steps", "batch_size", "gradient_accumulation", "num_processes", "cutoff_len", "save_steps",
                     "eval_steps", "logging_steps", "warmup_steps", "seed", "checkpoint_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise BadInput(f"{name}: {v!r} must be an integer")
        if self.max_steps == 0 and self.epochs <= 0:
            raise BadInput("epochs: set epochs > 0 or max_steps > 0")


@dataclass
class TrainConfig:
    """A whole training run, as in the YAML of `python -m webui train --config FILE.yaml`."""

    output: str
    dataset: DatasetConfig
    lora: LoraTrainConfig = field(default_factory=LoraTrainConfig)
    training: TrainingParams = field(default_factory=TrainingParams)
    base_model: str = ""  # models-dir name, path, or downloaded hub id; empty = the embedded model
    method: MethodName = _opt("sft", _METHOD_HELP)

    def __post_init__(self):
        _validate(self)
        preference = self.dataset.format == "preference"
        if self.method == "sft" and preference:
            raise BadInput("method: preference data trains with method dpo, orpo or kto, not sft")
        if self.method != "sft" and not preference:
            raise BadInput(f"dataset.format: method {self.method} learns from preference data (format preference: "
                           f"prompt/chosen/rejected pairs or prompt/completion/label ratings), not "
                           f"{self.dataset.format}")
        if self.method != "sft" and self.training.packing:
            raise BadInput(f"training.packing: method {self.method} keeps each reply in a row of its own (TRL's "
                           "trainers pad); turn packing off")

    @classmethod
    def from_dict(cls, data) -> "TrainConfig":
        if not isinstance(data, dict):
            raise BadInput("the training config must be a YAML mapping with output, dataset, lora, training")
        unknown = sorted(set(data) - {"output", "dataset", "lora", "training", "base_model", "method"})
        if unknown:
            raise BadInput(f"unknown top-level key(s): {', '.join(unknown)}; allowed: base_model, dataset, "
                              "lora, method, training, output")
        output = data.get("output")
        if not output or not isinstance(output, str):
            raise BadInput("output: give the adapter's name")
        return cls(output=output, base_model=str(data.get("base_model") or ""), method=data.get("method") or "sft",
                   dataset=_nested(DatasetConfig, "dataset", data.get("dataset")),
                   lora=_nested(LoraTrainConfig, "lora", data.get("lora")),
                   training=_nested(TrainingParams, "training", data.get("training")))

    def to_dict(self) -> dict:
        return {"base_model": self.base_model, "output": self.output, "method": self.method,
                "dataset": dataclasses.asdict(self.dataset),
                "lora": dataclasses.asdict(self.lora), "training": dataclasses.asdict(self.training)}


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
