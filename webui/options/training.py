"""The training options: the sections of a run file (`python -m webui train --config FILE.yaml`, the Training
tab's form) as dataclasses in the style of the other options (webui/options/config.py: `_opt` fields with help
texts and ranges, validated when made, errors naming the field). A concept of their own: the run file, its
sections and how they check each other (method and data format, packing, warm-up).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from webui.errors import BadInput
from webui.options import lora_options
from webui.options.config import DatasetFormat, QuantizationName, _opt, _validate

TaskType = Literal["CAUSAL_LM", "SEQ_2_SEQ_LM"]
BiasName = Literal["none", "all", "lora_only"]
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

