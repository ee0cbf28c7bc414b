"""The transformers loader: a local Hugging Face model folder (safetensors preferred, `.bin` loaded by
transformers with `weights_only=True`) or a `.gguf` file (dequantized through `gguf_file=`), in
float32/bfloat16/float16, on CUDA when present else CPU. Generation is a continuous batch (`decoder()`,
webui/backends/hf/continuous.py) that every request joins through Engine.submit.

The checks in `preflight` run before the Engine unloads the previous model, so a folder that is missing
files or has a broken config is refused with a message naming the problem and costs the user nothing.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
)

from webui.adapters.peft_stack import PeftAdapterStack
from webui.adapters.targets import describe_base
from webui.backends import embedded, machine
from webui.backends.base import (
    SAMPLERS,
    Backend,
    Capabilities,
    LoadedInfo,
    TokenScores,
    incremental_texts,
    plain_transcript,
)
from webui.backends.hf import bnb
from webui.backends.hf.continuous import HfDecoder
from webui.backends.hf.grammar import Grammars
from webui.errors import BadInput, LoadFailed, NotFound, Unsupported, first_line
from webui.options.config import ModelSpec
from webui.progress import Progress, no_progress

WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "model*.bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
SCORE_LOGITS_BYTES = 256 << 20  # float32 logits held at once while scoring: rows x length x vocabulary


def pick_device(requested: str = "auto") -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise LoadFailed("device cuda was requested but no CUDA GPU is available")
    return requested


def pick_dtype(requested: str, device: str, path: Path | None = None) -> torch.dtype:
    """auto: bfloat16 on GPUs that support it, else float16 on CUDA. On CPU, a bf16 checkpoint stays bf16 where
    the CPU computes bf16 natively (AVX512-BF16 or AMX: the check training's `precision: auto` makes); otherwise
    float32 (half-precision matmuls are slow on other CPUs), unless a float32 copy would not fit in free memory
    while the checkpoint's own half precision does: then it stays in that (slower, but it runs)."""
    if requested != "auto":
        return getattr(torch, requested)
    if device == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    source = machine.source_dtype(path) if path is not None and Path(path).is_dir() else ""
    if source == "bfloat16" and machine.cpu_computes_bf16():
        return torch.bfloat16
    if source in ("bfloat16", "float16") and machine.load_need(path, 4) > machine.available() \
            >= machine.load_need(path, 2):
        return getattr(torch, source)
    return torch.float32


def _upcast(model, dtype: torch.dtype):
    """`model`, loaded in its checkpoint's half precision (its weights still in the memory-mapped file), converted
    to `dtype` one weight at a time, each weight's pages of the file dropped once converted: loading a bf16
    checkpoint straight into float32 held the float32 copy and the whole file at once (3.4x the checkpoint at
    1.1B). The values are the same: a bf16 or fp16 number widens to float32 exactly."""
    mappings = machine.file_mappings()
    with torch.no_grad():
        for module in model.modules():
            for param in module.parameters(recurse=False):
                if param.dtype != dtype and param.is_floating_point():
                    old = param.data
                    param.data = old.to(dtype)
                    machine.drop_file_pages(old, mappings)
    return model.to(dtype)  # buffers, and anything left


def _find_weights(path: Path) -> list[Path]:
    found: list[Path] = []
    for pattern in WEIGHT_PATTERNS:
        found += sorted(path.glob(pattern))
    return found


class TransformersBackend(Backend):
    name = "transformers"
    settings = ("dtype", "device", "quantization")

    def __init__(self):
        self.model = None
        self.tokenizer = None
        self.device = "cpu"
        self.info: LoadedInfo | None = None
        self.adapters = None  # a PeftAdapterStack once an adapter is loaded
        self._base_description = None
        self.source_dtype = ""  # the dtype the model folder was saved in (exports keep it)
        self.grammars: Grammars | None = None  # structured output, compiled per schema on first use
        self.quantization = "none"  # bitsandbytes quantization applied while loading (webui/backends/hf/bnb.py)

    # -- what the registry asks ------------------------------------------------------------------
    @classmethod
    def claims(cls, path: Path) -> bool:
        return True  # a folder, a GGUF (dequantized) or a GPTQ folder: the fallback for every format

    @classmethod
    def embedded(cls, models_dir: Path, progress: Progress | None = None) -> Path:
        return embedded.ensure_transformers_folder(models_dir, progress)

    @classmethod
    def training_model(cls, path: Path, device: str, dtype, quantization: str = "none"):
        if quantization != "none":  # QLoRA: the base quantized by bitsandbytes, LoRA in `dtype`
            return bnb.training_model(path, device, dtype, quantization)
        return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(device)

    # -- lifecycle -------------------------------------------------------------------------------
    @classmethod
    def preflight(cls, path: Path, spec: ModelSpec) -> None:
        if not path.exists():
            raise NotFound(f"model not found: {path}")
        if path.is_file():
            if path.suffix != ".gguf":
                raise LoadFailed(f"{path.name}: not a model folder or .gguf file")
            _check_gguf_header(path)
            bnb.check_quantizable(path, spec.quantization)
            return
        config_file = path / "config.json"
        if not config_file.is_file():
            raise LoadFailed(f"{path.name}: config.json is missing — not a transformers model folder")
        try:
            json.loads(config_file.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise LoadFailed(f"{path.name}: config.json is not valid JSON ({e})") from None
        try:
            AutoConfig.from_pretrained(str(path), local_files_only=True)
        except Exception as e:  # unknown model_type, missing keys, ...
            raise LoadFailed(f"{path.name}: config.json is broken: {first_line(e)}") from None
        weights = _find_weights(path)
        if not weights:
            raise LoadFailed(f"{path.name}: no weights file (model.safetensors or pytorch_model.bin)")
        _check_shards(path)
        for w in weights:
            if w.suffix == ".safetensors":
                _check_safetensors(w)
        if not any((path / f).is_file() for f in TOKENIZER_FILES):
            raise LoadFailed(f"{path.name}: no tokenizer (tokenizer.json, tokenizer.model or vocab.json)")
        bnb.check_quantizable(path, spec.quantization)

    @classmethod
    def memory_need(cls, path: Path, spec: ModelSpec) -> int:
        if spec.quantization != "none" or not Path(path).is_dir() or pick_device(spec.device) != "cpu":
            return 0  # GPU memory and bitsandbytes' packing are not estimated here
        return machine.load_need(path, pick_dtype(spec.dtype, "cpu", path).itemsize)

    def memory_held(self) -> int:
        if self.model is None or self.device != "cpu":
            return 0
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    def load(self, path: Path, spec: ModelSpec, progress: Progress = no_progress) -> LoadedInfo:
        self.device = pick_device(spec.device)
        dtype = pick_dtype(spec.dtype, self.device, path)
        self.quantization = spec.quantization
        where, kwargs = (str(path), {}) if path.is_dir() else (str(path.parent), {"gguf_file": path.name})
        progress(0.1, f"loading tokenizer of {path.name}")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(where, local_files_only=True, **kwargs)
            progress(0.3, f"loading weights of {path.name} ({dtype}, {self.device})")
            model = self._from_pretrained(where, dtype, **kwargs)
        except Exception as e:
            self.unload()
            raise LoadFailed(f"could not load {path.name}: {first_line(e)}") from e
        self.model = model.eval()
        if path.is_dir():
            cfg_json = json.loads((path / "config.json").read_text())
            self.source_dtype = str(cfg_json.get("dtype") or cfg_json.get("torch_dtype") or "")
        if self.tokenizer.pad_token_id is None and self.tokenizer.eos_token_id is not None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        cfg = self.model.config
        self.info = LoadedInfo(
            name=path.name, path=str(path), loader=self.name, device=self.device,
            dtype=str(dtype).removeprefix("torch."), architecture=(cfg.architectures or [type(self.model).__name__])[0],
            parameters=sum(p.numel() for p in self.model.parameters()),
            context_length=int(getattr(cfg, "max_position_embeddings", 0) or getattr(cfg, "n_positions", 0) or 0))
        if self.quantization != "none":
            self.info.dtype = bnb.describe(self.quantization, dtype)
            self.info.parameters = bnb.float_parameter_count(self.model)
        progress(1.0, f"loaded {path.name}")
        return self.info

    def _from_pretrained(self, where: str, dtype, **kwargs):
        """The model's weights on self.device (the GPTQ loader overrides this to load 4-bit layers)."""
        if self.quantization != "none":
            return bnb.load(where, self.quantization, self.device, dtype, local_files_only=True, **kwargs)
        source = getattr(torch, machine.source_dtype(Path(where)) or "float32", torch.float32) if not kwargs else None
        if self.device == "cpu" and dtype == torch.float32 and source in (torch.bfloat16, torch.float16):
            return _upcast(AutoModelForCausalLM.from_pretrained(where, dtype=source, local_files_only=True), dtype)
        return AutoModelForCausalLM.from_pretrained(where, dtype=dtype, local_files_only=True, **kwargs).to(self.device)

    def unload(self) -> None:
        self.adapters = None
        self._base_description = None
        self.grammars = None
        self.model = None
        self.tokenizer = None
        self.info = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    @property
    def capabilities(self) -> Capabilities:
        quantized = self.quantization != "none"  # merging into bitsandbytes weights is refused (bnb.MERGE_REFUSED)
        return Capabilities(loader=self.name, samplers=SAMPLERS, settings=self.settings,
                            adapters=True, adapter_stack=True, merge=not quantized, mixed_batch=True,
                            extra={"quantization": self.quantization,
                                   "merge_instead": "merge on a float copy (--quantization none, or export)"}
                            if quantized else {})

    # -- adapters (PEFT) ------------------------------------------------------------------------------
    def describe_base(self):
        if self._base_description is None:
            self._base_description = describe_base(self.model, self.info.name)
        return self._base_description

    @property
    def adapters_loaded(self) -> dict:
        return dict(self.adapters.loaded) if self.adapters else {}

    @property
    def active_adapters(self) -> dict:
        return dict(self.adapters.active) if self.adapters else {}

    @property
    def merged(self) -> bool:
        return bool(self.adapters and self.adapters.merged)

    def load_adapter(self, name: str, files, state: dict, report) -> None:
        if files.format == "gguf":  # its q/k tensors are in llama.cpp's layout: PEFT would apply them wrongly
            raise BadInput(f"{name} is a GGUF LoRA file, which runs on the llama.cpp loader only; "
                               "use the adapter's PEFT folder on this loader")
        self.describe_base()  # read the plain base's layers before PEFT wraps them
        if self.adapters is None:
            self.adapters = PeftAdapterStack(self.model)
        self.adapters.add(name, files.config, state, ignored=report.ignored_targets, signature=files.signature())

    def set_adapters(self, weights: dict[str, float]) -> None:
        if self.adapters is None:
            if weights:
                raise Unsupported("no adapter is loaded")
            return
        self.adapters.set_active(weights)

    def delete_adapter(self, name: str) -> None:
        if self.adapters:
            self.adapters.delete(name)

    def merge_adapters(self) -> None:
        if self.quantization != "none":
            raise Unsupported(bnb.MERGE_REFUSED)
        if not self.adapters:
            raise BadInput("no adapter is active: nothing to merge")
        self.adapters.merge()

    def unmerge_adapters(self) -> None:
        if self.adapters:
            self.adapters.unmerge()

    def save_merged(self, out_dir: Path) -> None:
        if self.quantization != "none":
            raise Unsupported(bnb.MERGE_REFUSED)
        model = self.model
        if self.adapters is not None and self.adapters.peft is not None:
            if self.adapters.merged:
                self.adapters.unmerge()
            if self.adapters.active:
                model = self.adapters.peft.merge_and_unload(safe_merge=True)  # NaN/Inf check before keeping
            else:
                model = self.adapters.peft.unload()
        # Merged at the loaded precision; saved in the base's own dtype so the export is not bigger.
        saved_dtype = getattr(torch, self.source_dtype or "", None)
        if isinstance(saved_dtype, torch.dtype) and saved_dtype != model.dtype:
            model = model.to(saved_dtype)
        model.save_pretrained(str(out_dir), safe_serialization=True)
        self.tokenizer.save_pretrained(str(out_dir))
        self.adapters = None

    def blend_adapters(self, weights, new_name, combination_type, out_dir, density=None, **options):
        if not self.adapters:
            raise BadInput("load the adapters to blend first")
        return self.adapters.blend(weights, new_name, combination_type, out_dir, density=density, **options)

    # -- text --------------------------------------------------------------------------------------
    def chat_prompt(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if not getattr(self.tokenizer, "chat_template", None):
            return plain_transcript(messages, add_generation_prompt)
        return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def _grammars(self) -> Grammars:
        if self.grammars is None:
            self.grammars = Grammars(self.tokenizer, self.model.config.get_text_config().vocab_size)
        return self.grammars

    def prepare_response_format(self, response_format: str) -> None:
        if response_format:
            self._grammars().compile(response_format)

    def grammar_processor(self, response_format: str):
        """A fresh logits processor enforcing `response_format` for one generation (it holds the parse state)."""
        return self._grammars().processor(response_format)

    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        # A chat-template prompt already starts with BOS; adding another would change the output.
        bos = self.tokenizer.bos_token
        add_special = add_special and not (bos and text.startswith(bos))
        return list(self.tokenizer(text, add_special_tokens=add_special)["input_ids"])

    def token_texts(self, ids: list[int]) -> list[str]:
        return incremental_texts(self.tokenizer.decode, ids)

    def detokenize(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    @property
    def eos_token_id(self) -> int | None:
        return self.tokenizer.eos_token_id

    def score(self, sequences: list[list[int]], top_k: int = 0) -> list[TokenScores]:
        """Right-padded batches through the model (causal attention: padding after a row changes nothing
        before it), log-softmax in float32. Rows are batched so the logits stay under SCORE_LOGITS_BYTES."""
        vocab = self.model.config.get_text_config().vocab_size
        out: list[TokenScores] = []
        i = 0
        while i < len(sequences):
            width = len(sequences[i])
            rows = max(1, SCORE_LOGITS_BYTES // max(1, width * vocab * 4))
            chunk = sequences[i:i + rows]
            width = max(len(s) for s in chunk)
            ids = torch.full((len(chunk), width), self.tokenizer.pad_token_id or 0, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for r, s in enumerate(chunk):
                ids[r, :len(s)] = torch.tensor(s)
                mask[r, :len(s)] = 1
            logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
            logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
            for r, s in enumerate(chunk):
                n = len(s) - 1
                target = torch.tensor(s[1:], device=logp.device, dtype=torch.long)
                picked = logp[r, :n].gather(1, target[:, None])[:, 0].tolist()
                top = None
                if top_k:
                    values, indices = logp[r, :n].topk(top_k, dim=-1)
                    top = [list(zip(ix, v)) for ix, v in zip(indices.tolist(), values.tolist())]
                out.append(TokenScores(list(s), picked, top))
            i += len(chunk)
        return out

    def decoder(self) -> HfDecoder:
        return HfDecoder(self)


def _check_shards(path: Path) -> None:
    index = path / "model.safetensors.index.json"
    if not index.is_file():
        return
    try:
        shards = set(json.loads(index.read_text())["weight_map"].values())
    except (ValueError, KeyError) as e:
        raise LoadFailed(f"{path.name}: model.safetensors.index.json is broken ({e})") from None
    missing = sorted(s for s in shards if not (path / s).is_file())
    if missing:
        raise LoadFailed(f"{path.name}: weight shard(s) missing: {', '.join(missing)}")


def _check_safetensors(file: Path) -> None:
    try:
        with safe_open(str(file), framework="pt") as f:
            keys = list(f.keys())
    except Exception as e:
        raise LoadFailed(f"{file.parent.name}/{file.name} is corrupt or truncated: {first_line(e)}") from None
    if not keys:
        raise LoadFailed(f"{file.parent.name}/{file.name} holds no tensors")


def _check_gguf_header(file: Path) -> None:
    with open(file, "rb") as f:
        if f.read(4) != b"GGUF":
            raise LoadFailed(f"{file.name} is not a GGUF file (bad magic bytes)")
