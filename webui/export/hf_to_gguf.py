"""A transformers model folder → a GGUF file llama.cpp loads (F32, F16, BF16 or Q8_0), with the `gguf` package,
one tensor at a time: the tensor table is written first from the safetensors headers, then each tensor is read
(memory-mapped), merged with the adapters when exporting (webui/export/stream_merge.py), converted and written,
so converting holds one tensor, not the model (gguf's GGUFWriter.add_tensor would keep every array until the
end).

llama.cpp's own converter (convert_hf_to_gguf.py) lives only in its source tree and needs a newer gguf-py
than PyPI's, so this is the smallest converter for what we can test: Llama (and SmolLM2, the embedded
model's transformers folder), Mistral without a sliding window, and Qwen2, with a byte-level BPE
tokenizer (GPT-2 style, as `tokenizer.json` describes it). Tensor names come from the gguf package's
HF→GGUF map; for llama-architecture GGUFs q/k rows are permuted the way llama.cpp's converter does (see
webui.adapters.gguf_lora.permute_rows); hyper-parameters,
special tokens, merges and the chat template are written as llama.cpp reads them. Anything else is
refused with a message that names what is missing.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from transformers import AutoTokenizer

from webui.adapters.gguf_lora import PERMUTED_ARCHS, NameMap, gguf_module, permute_rows
from webui.adapters.surgery.folders import ModelTensors
from webui.errors import BadInput, Unsupported
from webui.export.stream_merge import MergePlan
from webui.progress import Progress, no_progress

# transformers model_type -> GGUF architecture, as llama.cpp's converter writes them (Mistral without a
# sliding window is a Llama to llama.cpp). q/k rows are permuted for the GGUF archs in PERMUTED_ARCHS.
SUPPORTED = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}


def _rope_theta(cfg: dict) -> float:
    # transformers 5 keeps rope_theta inside rope_parameters; 4.x at the top level
    params = cfg.get("rope_parameters") or {}
    return float(params.get("rope_theta") or cfg.get("rope_theta") or 10000.0)


def _check_rope(cfg: dict) -> None:
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    kind = params.get("rope_type") or params.get("type") or "default"
    if kind not in ("default", None):
        raise Unsupported(f"rope scaling {kind!r} is not written to GGUF by this converter")


def _add_tokenizer(writer, folder: Path, n_vocab: int) -> None:
    gguf = gguf_module()
    tj_file = folder / "tokenizer.json"
    if not tj_file.is_file():
        raise Unsupported(f"{folder.name}: no tokenizer.json (only fast byte-level BPE tokenizers convert)")
    tj = json.loads(tj_file.read_text(encoding="utf-8"))
    model, pre = tj.get("model") or {}, tj.get("pre_tokenizer") or {}
    if model.get("type") != "BPE" or (tj.get("decoder") or {}).get("type") != "ByteLevel" \
            or pre.get("type") != "ByteLevel" or pre.get("add_prefix_space") or not pre.get("use_regex", True):
        raise Unsupported(f"{folder.name}: only GPT-2 style byte-level BPE tokenizers are written to GGUF "
                                   "here")
    # gguf's BpeVocab marks special tokens that are also in the BPE vocab as NORMAL; llama.cpp needs
    # them CONTROL to parse "<|im_start|>" as one token and to hide it in output, so the list is built here.
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [gguf.TokenType.UNUSED] * n_vocab
    for text, i in model["vocab"].items():
        if i < n_vocab:
            tokens[i], types[i] = text, gguf.TokenType.NORMAL
    for added in tj.get("added_tokens") or []:
        i = added["id"]
        if i < n_vocab:
            tokens[i] = added["content"]
            types[i] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")  # the GPT-2 split regex, which ByteLevel(use_regex=True) applies
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=n_vocab)
    special.add_special_token["bos"] = _adds_bos(folder)
    special.add_special_token.setdefault("eos", False)
    special.add_to_gguf(writer, quiet=True)


def _adds_bos(folder: Path) -> bool:
    """Whether the HF tokenizer puts BOS in front of plain text (so llama.cpp does the same)."""
    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    ids = tok("a")["input_ids"]
    return tok.bos_token_id is not None and len(ids) > len(tok("a", add_special_tokens=False)["input_ids"]) \
        and ids[0] == tok.bos_token_id


# What a converted tensor is stored as: llama.cpp's converter's output types (gguf's numpy quantizers write them
# bit for bit as llama.cpp's do); k-quants come from llama.cpp's quantizer, after this writes a lossless file.
FTYPES = ("F32", "F16", "BF16", "Q8_0")


class HfToGguf:
    """A transformers folder's tensors in GGUF names and layout, merged with `plan` (webui/export/stream_merge.py)
    when given, read and converted one at a time."""

    def __init__(self, folder: Path, plan: MergePlan | None = None):
        self.folder = Path(folder)
        self.plan = plan or MergePlan()
        self.cfg = json.loads((self.folder / "config.json").read_text(encoding="utf-8"))
        model_type = self.cfg.get("model_type", "")
        if model_type not in SUPPORTED:
            raise Unsupported(f"{self.folder.name}: writing a {model_type or 'unknown'} model to GGUF is not "
                              f"supported (supported: {', '.join(SUPPORTED)})")
        if self.cfg.get("sliding_window") and self.cfg.get("use_sliding_window", True):
            raise Unsupported(f"{self.folder.name}: sliding-window attention is not written to GGUF by this converter")
        _check_rope(self.cfg)
        self.arch = SUPPORTED[model_type]
        self.n_head = int(self.cfg["num_attention_heads"])
        self.n_head_kv = int(self.cfg.get("num_key_value_heads") or self.n_head)
        self.names = NameMap(self.arch, int(self.cfg["num_hidden_layers"]))
        try:
            self.base = ModelTensors(self.folder)
        except BadInput as e:
            raise Unsupported(f"{self.folder.name}: no safetensors weights to convert ({e})") from None
        tied = bool(self.cfg.get("tie_word_embeddings", False))
        self.keys: dict[str, str] = {}  # GGUF tensor name -> HF key, in the folder's order
        for key in self.base.keys():
            if key.endswith("rotary_emb.inv_freq") or (tied and key == "lm_head.weight"):
                continue  # computed by llama.cpp / shared with token_embd
            module, _, suffix = key.rpartition(".")
            gname = self.names.to_gguf(module)
            if gname is None or suffix not in ("weight", "bias"):
                raise Unsupported(f"{self.folder.name}: tensor {key} has no GGUF name for the {self.arch} "
                                  "architecture")
            self.keys[f"{gname}.{suffix}"] = key

    def _layout(self, name: str, w: np.ndarray) -> np.ndarray:
        if self.arch in PERMUTED_ARCHS and name.endswith(".attn_q.weight"):
            return permute_rows(w, self.n_head, self.n_head)
        if self.arch in PERMUTED_ARCHS and name.endswith(".attn_k.weight"):
            return permute_rows(w, self.n_head, self.n_head_kv)
        return w

    def array(self, name: str) -> np.ndarray:
        """GGUF tensor `name` as float32, merged (in the base's dtype first, as a merged folder stores it)."""
        key = self.keys[name]
        return self._layout(name, self.plan.merged(key, self.base.get(key)).float().numpy())

    def unmerged(self, name: str) -> np.ndarray:
        key = self.keys[name]
        return self._layout(name, self.plan.base(key, self.base.get(key)).float().numpy())

    def delta(self, name: str) -> np.ndarray | None:
        d = self.plan.delta(self.keys[name])
        return None if d is None else self._layout(name, d.numpy())

    def changed(self) -> list[str]:
        return [name for name, key in self.keys.items() if key in self.plan.changes]

    def write(self, out: Path, ftype: str = "F32", name: str | None = None, progress: Progress = no_progress) -> Path:
        """Write the GGUF at `out`: 2-D weights as `ftype` (Q8_0 rows not a multiple of its 32-value blocks as
        F16, as llama.cpp's converter does), norms and biases F32; one tensor in memory at a time."""
        gguf = gguf_module()
        if ftype not in FTYPES:
            raise Unsupported(f"hf_to_gguf writes {', '.join(FTYPES)}, not {ftype}")
        writer = gguf.GGUFWriter(str(out), self.arch)
        self._add_metadata(writer, gguf, ftype, name)
        types = {}
        for gname, key in self.keys.items():
            shape = tuple(self.base.shape(key))
            qtype = _stored_type(gguf, ftype, shape)
            types[gname] = qtype
            if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
                dtype = np.float32 if qtype == gguf.GGMLQuantizationType.F32 else np.float16
                writer.add_tensor_info(gname, shape, np.dtype(dtype), int(np.prod(shape)) * np.dtype(dtype).itemsize)
            else:
                byte_shape = gguf.quants.quant_shape_to_byte_shape(shape, qtype)
                writer.add_tensor_info(gname, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for i, gname in enumerate(self.keys):
            writer.write_tensor_data(_encoded(gguf, self.array(gname), types[gname]))
            if i % 25 == 0:
                progress(None, f"converted {i + 1}/{len(self.keys)} tensors")
        writer.close()
        return out

    def _add_metadata(self, writer, gguf, ftype: str, name: str | None) -> None:
        cfg = self.cfg
        hidden, n_head = int(cfg["hidden_size"]), self.n_head
        head_dim = int(cfg.get("head_dim") or hidden // n_head)
        n_vocab = int(cfg["vocab_size"])
        writer.add_name(name or self.folder.name)
        writer.add_context_length(int(cfg.get("max_position_embeddings") or 2048))
        writer.add_embedding_length(hidden)
        writer.add_feed_forward_length(int(cfg["intermediate_size"]))
        writer.add_block_count(int(cfg["num_hidden_layers"]))
        writer.add_head_count(n_head)
        writer.add_head_count_kv(self.n_head_kv)
        writer.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
        writer.add_rope_freq_base(_rope_theta(cfg))
        writer.add_rope_dimension_count(head_dim)
        if head_dim != hidden // n_head:
            writer.add_key_length(head_dim)
            writer.add_value_length(head_dim)
        writer.add_vocab_size(n_vocab)
        writer.add_file_type(getattr(gguf.LlamaFileType, "ALL_F32" if ftype == "F32" else f"MOSTLY_{ftype}"))
        if ftype == "Q8_0":
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)  # as llama.cpp's quantizer records it
        _add_tokenizer(writer, self.folder, n_vocab)


def _stored_type(gguf, ftype: str, shape: tuple):
    types = gguf.GGMLQuantizationType
    if len(shape) != 2 or ftype == "F32":
        return types.F32
    if ftype == "Q8_0" and shape[-1] % gguf.GGML_QUANT_SIZES[types.Q8_0][0]:
        return types.F16
    return types[ftype]


def _encoded(gguf, w: np.ndarray, qtype) -> np.ndarray:
    types = gguf.GGMLQuantizationType
    if qtype == types.F32:
        return np.ascontiguousarray(w, dtype=np.float32)
    if qtype == types.F16:
        return np.ascontiguousarray(w, dtype=np.float16)
    return gguf.quants.quantize(np.ascontiguousarray(w, dtype=np.float32), qtype)


def hf_to_gguf(folder: Path, out: Path, ftype: str = "F32", name: str | None = None) -> Path:
    """Write `folder` (a transformers Llama/Mistral/Qwen2 model) as a GGUF file at `out` (2-D weights as
    `ftype`, one of FTYPES; norms and biases F32)."""
    return HfToGguf(folder).write(Path(out), ftype, name)
