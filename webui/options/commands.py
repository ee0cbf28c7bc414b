"""The options of the CLI's tool subcommands (`inspect`, `export`, `blend`, `train`, `publish`,
`llama-server-command`), one dataclass each: like `serve` (ServerConfig) and `eval` (ModelSpec + EvalConfig),
their flags, defaults and help come from these fields (webui/options/flags.py), so the signature is the CLI.
`download` keeps text-generation-webui's own flags (webui/hub/cli.py) and `loras` its sub-subcommands
(webui/adapters/library_cli.py)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from webui.options.config import _opt

# what `export --format` offers (webui/export/run.py dispatches on it)
ExportFormat = Literal["safetensors", "gguf", "gptq", "gguf-lora", "ollama"]
# PEFT add_weighted_adapter's combination types that blends offer ('cat' first: the exact one, the default)
Combination = Literal["cat", "linear", "svd", "ties", "ties_svd", "dare_linear", "dare_ties", "magnitude_prune"]
GgufLoraType = Literal["f32", "f16", "q8_0"]

_MODELS = "Folder of base models."
_LORAS = "Folder of LoRA adapters."


@dataclass
class InspectOptions:
    """`inspect ADAPTER`: does an adapter fit a base? The compatibility report."""

    adapter: str = _opt("", "a name in the loras dir, or a path to an adapter folder", positional=True)
    model: str = _opt("", "base to check against (a models-dir name or a path; only its config is read, no weights)")
    json: bool = _opt(False, "print the report as JSON")
    models_dir: str = _opt("models", _MODELS)
    loras_dir: str = _opt("loras", _LORAS)


@dataclass
class ExportOptions:
    """`export`: merge adapters into a base and write a model (or the adapters themselves for llama.cpp/Ollama)."""

    model: str = _opt("", "base (default: the embedded SmolLM2)")
    lora: list = _opt([], "adapter name(s) or path(s)")
    weights: list = _opt([], "a weight per adapter (default 1.0 each)", item=float)
    format: ExportFormat = _opt("safetensors", "what to write", required=True)
    out: str = _opt("", "where to write it (a folder; for gguf a .gguf file or a folder)", required=True)
    quant: str = _opt(None, "GGUF type: F32, F16, BF16, Q8_0, Q6_K, Q5_K_M, Q4_K_M, Q4_0, Q4_1, ... (default Q8_0 "
                            "for models under 3B parameters, else Q4_K_M)")
    bits: Literal[2, 3, 4, 8] = _opt(4, "GPTQ: bits per weight (default 4)")
    group_size: int = _opt(None, "GPTQ: weights sharing one scale (default 128, or the largest of 64/32/16 that "
                                 "divides the model's layer sizes; -1 = one per column)")
    calibration: str = _opt(None, "GPTQ: a text file to calibrate on (default: webui/data/calibration.txt)")
    outtype: GgufLoraType = _opt(None, "gguf-lora / ollama: how the LoRA's tensors are stored (default f32, exact)")
    models_dir: str = _opt("models", _MODELS)
    loras_dir: str = _opt("loras", _LORAS)


@dataclass
class BlendOptions:
    """`blend`: combine adapters into a new one (exact for cat; refused where it cannot be)."""

    lora: list = _opt([], "adapter name(s) in the loras dir, or path(s)", required=True)
    weights: list = _opt([], "a weight per adapter (default 1.0 each)", item=float)
    combination: Combination = _opt("cat", "how to combine them: cat equals the stack; the others approximate it")
    density: float = _opt(None, "ties / dare: the fraction of values kept (default 0.5)")
    model: str = _opt("", "the base the adapters were trained for (default: the embedded SmolLM2); blending runs "
                          "on the transformers loader")
    models_dir: str = _opt("models", _MODELS)
    loras_dir: str = _opt("loras", _LORAS)
    out: str = _opt("", "the new adapter's name (written to the loras dir)", required=True)


@dataclass
class TrainOptions:
    """`train --config FILE.yaml`: train a LoRA (resumes a run of the same output)."""

    config: str = _opt("", "YAML with base_model, dataset, lora, training, output", required=True)
    models_dir: str = _opt("models", _MODELS)
    loras_dir: str = _opt("loras", _LORAS)
    runs_dir: str = _opt("runs", "Folder of training runs (checkpoints, metrics).")
    num_processes: int = _opt(0, "train in N processes (one per GPU; on CPU, N processes sharing the cores) through "
                                 "`accelerate launch` (DDP); default: training.num_processes in the YAML, else 1")
    accelerate_config: str = _opt(None, "an Accelerate config file (accelerate config), passed to `accelerate "
                                        "launch` unchanged: FSDP, DeepSpeed, several machines")


@dataclass
class PublishOptions:
    """`publish NAME_OR_PATH --to DEST`: upload an adapter (or an exported model folder) to the hub or S3."""

    source: str = _opt("", "an adapter name in the loras dir, or a folder path", positional=True,
                       metavar="NAME_OR_PATH")
    to: str = _opt("", "hf:ORG/NAME or s3://bucket/prefix", required=True, metavar="DEST")
    private: bool = _opt(False, "create the hub repo private (an existing repo keeps its visibility)")
    token: str = _opt(None, "a hub token with write access (default: HF_TOKEN, or the login saved by "
                            "`hf auth login`)")
    loras_dir: str = _opt("loras", _LORAS)
    runs_dir: str = _opt("runs", "training runs (the model card's losses come from here)")


@dataclass
class LlamaServerCommandOptions:
    """`llama-server-command`: the llama-server command that serves a GGUF base with our adapters."""

    model: str = _opt("", "the GGUF base (a models-dir name or a path)", required=True)
    lora: list = _opt([], "adapter names in the loras dir, or paths")
    binary: str = _opt("llama-server", "the llama-server executable")
    port: int = _opt(8080, "the port it listens on", min=1, max=65535)
    models_dir: str = _opt("models", _MODELS)
    loras_dir: str = _opt("loras", _LORAS)
