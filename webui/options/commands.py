"""The options of the CLI's tool subcommands (`inspect`, `export`, `blend`, `extract`, `resize`, `convert`,
`train`, `publish`, `llama-server-command`), one dataclass each: like `serve` (ServerConfig) and `eval`
(ModelSpec + EvalConfig), their flags, defaults and help come from these fields (webui/options/flags.py), so the
signature is the CLI.
`download` keeps text-generation-webui's own flags (webui/hub/cli.py) and `loras` its sub-subcommands
(webui/adapters/library_cli.py)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from webui.errors import BadInput
from webui.options.config import _opt, _validate

# what `export --format` offers (webui/export/run.py dispatches on it)
ExportFormat = Literal["safetensors", "gguf", "gptq", "gguf-lora", "ollama"]
# PEFT add_weighted_adapter's combination types that blends offer ('cat' first: the exact one, the default)
Combination = Literal["cat", "linear", "svd", "ties", "ties_svd", "dare_linear", "dare_ties", "magnitude_prune"]
GgufLoraType = Literal["f32", "f16", "q8_0"]
# the serving runtimes `inspect --target` knows the rules of (webui/adapters/surgery/runtimes.py)
Runtime = Literal["vllm", "sglang", "llamacpp", "ollama", "lorax", "loradeck"]

_MODELS = "Folder of base models."
_LORAS = "Folder of LoRA adapters."


@dataclass
class InspectOptions:
    """`inspect ADAPTER`: does an adapter fit a base? The compatibility report."""

    adapter: str = _opt("", "a name in the loras dir, or a path to an adapter folder", positional=True)
    model: str = _opt("", "base to check against (a models-dir name or a path; only its config is read, no weights)")
    json: bool = _opt(False, "print the report as JSON")
    target: Runtime = _opt(None, "also say whether it runs on that serving runtime as it stands (exit 3 if not), "
                                 "each reason and the command that fixes it")
    max_lora_rank: int = _opt(None, "--target vllm: the server's --max-lora-rank (default: vLLM's, 16)", min=1)
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


_GOAL_RANK = "the rank of every layer of the result"
_GOAL_ENERGY = "per layer, the smallest rank keeping this share of ‖ΔW‖² (e.g. 0.99): layers may differ"
_OUT = "the new adapter's name (written to the loras dir)"
_FORCE = "replace an existing adapter of that name"


def _goal(options, required: bool) -> None:
    """--rank R or --energy E, not both (and one of them where the command needs it)."""
    _validate(options)
    if options.rank is not None and options.energy is not None:
        raise BadInput("give --rank or --energy, not both")
    if required and options.rank is None and options.energy is None:
        raise BadInput("give --rank R or --energy E")


@dataclass
class ExtractOptions:
    """`extract --base B --tuned T (--rank R | --energy E) --out NAME`: a LoRA from a fine-tuned model and its base
    (per linear layer, a truncated SVD of T − B, read one tensor at a time); prints each layer's relative error."""

    base: str = _opt("", "the base model (a models-dir name or a folder path)", required=True)
    tuned: str = _opt("", "the fine-tuned model (a models-dir name or a folder path)", required=True)
    rank: int = _opt(None, _GOAL_RANK, min=1)
    energy: float = _opt(None, _GOAL_ENERGY, min=0.0, max=1.0)
    out: str = _opt("", _OUT, required=True)
    force: bool = _opt(False, _FORCE)
    models_dir: str = _opt("models", _MODELS)
    loras_dir: str = _opt("loras", _LORAS)

    def __post_init__(self):
        _goal(self, required=True)


@dataclass
class ResizeOptions:
    """`resize NAME (--rank R | --energy E) --out NAME2`: each layer's scaled B·A re-factored by a truncated SVD;
    prints the energy kept per layer and in total. A rank ≥ the adapter's reproduces it exactly."""

    adapter: str = _opt("", "an adapter in the loras dir, or a path", positional=True, metavar="NAME")
    rank: int = _opt(None, _GOAL_RANK, min=1)
    energy: float = _opt(None, _GOAL_ENERGY, min=0.0, max=1.0)
    out: str = _opt("", _OUT, required=True)
    force: bool = _opt(False, _FORCE)
    loras_dir: str = _opt("loras", _LORAS)

    def __post_init__(self):
        _goal(self, required=True)


@dataclass
class ConvertOptions:
    """`convert NAME --to lora [--rank R] --out NAME2`: a DoRA adapter's exact weight change on its base (read a
    layer at a time) factored into a plain LoRA of rank R (default: the source's); prints the error."""

    adapter: str = _opt("", "an adapter in the loras dir, or a path", positional=True, metavar="NAME")
    to: Literal["lora"] = _opt("lora", "the kind of adapter to write", required=True)
    rank: int = _opt(None, "the rank of every layer of the result (default: the source's; up to min(out, in): "
                           "exact)", min=1)
    energy: float = _opt(None, _GOAL_ENERGY, min=0.0, max=1.0)
    model: str = _opt("", "the base model (default: the adapter's base_model_name_or_path, in the models dir)")
    out: str = _opt("", _OUT, required=True)
    force: bool = _opt(False, _FORCE)
    models_dir: str = _opt("models", _MODELS)
    loras_dir: str = _opt("loras", _LORAS)

    def __post_init__(self):
        _goal(self, required=False)


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
