"""A transformers model folder → a GGUF file llama.cpp loads (F32 or F16), with the `gguf` package.

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
from safetensors import safe_open
from transformers import AutoTokenizer

from webui.adapters.gguf_lora import PERMUTED_ARCHS, NameMap, gguf_module, permute_rows
from webui.errors import Unsupported

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


def _weights(folder: Path):
    """(name, float32 numpy array) of every tensor in the folder's safetensors files."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise Unsupported(f"{folder.name}: no safetensors weights to convert")
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                yield key, f.get_tensor(key).float().numpy()


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


def hf_to_gguf(folder: Path, out: Path, ftype: str = "F32", name: str | None = None) -> Path:
    """Write `folder` (a transformers Llama/Mistral/Qwen2 model) as a GGUF file at `out`; ftype F32 or F16
    (the 2-D weights; norms and biases stay F32)."""
    gguf = gguf_module()
    folder, out = Path(folder), Path(out)
    cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    model_type = cfg.get("model_type", "")
    if model_type not in SUPPORTED:
        raise Unsupported(f"{folder.name}: writing a {model_type or 'unknown'} model to GGUF is not supported "
                                   f"(supported: {', '.join(SUPPORTED)})")
    if cfg.get("sliding_window") and cfg.get("use_sliding_window", True):
        raise Unsupported(f"{folder.name}: sliding-window attention is not written to GGUF by this converter")
    _check_rope(cfg)
    if ftype not in ("F32", "F16"):
        raise Unsupported(f"hf_to_gguf writes F32 or F16, not {ftype}")
    n_layers, n_head = int(cfg["num_hidden_layers"]), int(cfg["num_attention_heads"])
    n_head_kv = int(cfg.get("num_key_value_heads") or n_head)
    hidden = int(cfg["hidden_size"])
    head_dim = int(cfg.get("head_dim") or hidden // n_head)
    n_vocab = int(cfg["vocab_size"])
    arch = SUPPORTED[model_type]
    names = NameMap(arch, n_layers)

    writer = gguf.GGUFWriter(str(out), arch)
    writer.add_name(name or folder.name)
    writer.add_context_length(int(cfg.get("max_position_embeddings") or 2048))
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(int(cfg["intermediate_size"]))
    writer.add_block_count(n_layers)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head_kv)
    writer.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
    writer.add_rope_freq_base(_rope_theta(cfg))
    writer.add_rope_dimension_count(head_dim)
    if head_dim != hidden // n_head:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(n_vocab)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32 if ftype == "F32" else gguf.LlamaFileType.MOSTLY_F16)
    _add_tokenizer(writer, folder, n_vocab)

    tied = bool(cfg.get("tie_word_embeddings", False))
    for key, w in _weights(folder):
        if key.endswith("rotary_emb.inv_freq") or (tied and key == "lm_head.weight"):
            continue  # computed by llama.cpp / shared with token_embd
        module, _, suffix = key.rpartition(".")
        gname = names.to_gguf(module)
        if gname is None or suffix not in ("weight", "bias"):
            raise Unsupported(f"{folder.name}: tensor {key} has no GGUF name for the {arch} architecture")
        if arch in PERMUTED_ARCHS and gname.endswith(".attn_q"):
            w = permute_rows(w, n_head, n_head)
        elif arch in PERMUTED_ARCHS and gname.endswith(".attn_k"):
            w = permute_rows(w, n_head, n_head_kv)
        dtype = np.float16 if ftype == "F16" and w.ndim == 2 else np.float32
        writer.add_tensor(f"{gname}.{suffix}", np.ascontiguousarray(w, dtype=dtype))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out
