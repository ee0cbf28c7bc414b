"""LoRA adapters as llama.cpp wants them: GGUF LoRA files, next to the GGUF base they run on.

A GGUF base is described (`read_base`) by its architecture, head counts and 2-D tensors, translated back
to Hugging Face module names with the `gguf` package's tensor-name map, so the Engine's compatibility
check (`webui.adapters.inspect`) runs unchanged on it. A PEFT adapter is converted to a GGUF LoRA
(`convert_peft`: tensors `blk.N.attn_q.weight.lora_a/.lora_b`, `general.type=adapter`, `adapter.type=lora`,
`adapter.lora.alpha`) once and cached beside the adapter as `adapter.<base>.<source>.gguf`, reused while the
adapter's files are unchanged; `write_gguf_lora` / `stack_pairs` also serve the gguf-lora export (a weighted
stack as one adapter, f32/f16/q8_0). GGUF LoRA files found in the loras folder are read as they are
(`read_gguf_adapter`/`load_gguf_state` present them as PEFT-shaped tensors for the report).

llama.cpp's HF→GGUF converter permutes the q/k projection rows of llama-architecture models (its rotary
layout differs from transformers'); the B matrix of a q/k LoRA is permuted the same way (`permute_rows`).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from webui.adapters.targets import BaseDescription, Layer
from webui.adapters.types import AdapterFiles, split_key
from webui.atomic import write_into_place
from webui.errors import BadInput

# Architectures whose GGUF q/k weights are row-permuted relative to transformers (llama.cpp's LlamaModel
# converter, which also writes Mistral-style models as "llama"). NEOX-rope models (qwen2, phi3, ...) are not.
PERMUTED_ARCHS = ("llama",)
_HF_STYLE = re.compile(r"^(model\.layers\.\d+\.(self_attn|mlp)\.\w+|model\.embed_tokens|model\.norm|lm_head)$")
_BLK = re.compile(r"^blk\.(\d+)\.")


def display_name(file_name: str) -> str:
    """'SmolLM2-135M-Instruct.Q4_1.gguf' → 'SmolLM2-135M-Instruct': the name an adapter records as its base."""
    return re.sub(r"[.-](Q\d\w*|IQ\d\w*|F16|F32|BF16)$", "", file_name.removesuffix(".gguf"), flags=re.IGNORECASE)


def gguf_module():
    """The `gguf` package, imported on first use (heavy: its tensor tables take a while to build)."""
    import gguf
    return gguf


def field_value(reader, key: str, default=None):
    f = reader.fields.get(key)
    return f.contents() if f is not None else default


def arch_enum(arch: str):
    gguf = gguf_module()
    for enum, name in gguf.MODEL_ARCH_NAMES.items():
        if name == arch:
            return enum
    raise BadInput(f"GGUF architecture {arch!r} is unknown to the gguf package")


def permute_rows(w, n_head: int, n_head_kv: int | None = None):
    """llama.cpp's q/k permutation (HF rotary halves → interleaved pairs), on the rows of `w` (out, ...)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


class NameMap:
    """HF module names ↔ GGUF tensor base names (without `.weight`) for one architecture."""

    def __init__(self, arch: str, n_blocks: int):
        gguf = gguf_module()
        self.arch = arch
        self.tmap = gguf.get_tensor_name_map(arch_enum(arch), max(n_blocks, 1))
        self._to_hf: dict[str, str] = {}
        for hf, (_, gname) in self.tmap.mapping.items():
            if hf == gname:
                continue
            if gname not in self._to_hf or (_HF_STYLE.match(hf) and not _HF_STYLE.match(self._to_hf[gname])):
                self._to_hf[gname] = hf

    def to_gguf(self, module: str) -> str | None:
        return self.tmap.get_name(module)

    def to_hf(self, gname: str) -> str | None:
        return self._to_hf.get(gname)


@dataclass
class GgufBase:
    """What adapters are checked against and converted for: a GGUF base model's shape."""

    path: Path
    arch: str
    n_layers: int
    n_head: int
    n_head_kv: int
    tensors: dict = field(default_factory=dict)   # GGUF name (no .weight) -> (in, out) of each 2-D weight
    names: NameMap | None = None
    description: BaseDescription | None = None
    fingerprint: str = ""
    parameters: int = 0

    @property
    def permuted(self) -> bool:
        return self.arch in PERMUTED_ARCHS

    def permute_b(self, gname: str, b):
        """Apply the base's q/k row permutation to a LoRA B (out, r) or a delta (out, in)."""
        if not self.permuted:
            return b
        if gname.endswith(".attn_q"):
            return permute_rows(b, self.n_head, self.n_head)
        if gname.endswith(".attn_k"):
            return permute_rows(b, self.n_head, self.n_head_kv)
        return b


def read_base(path: Path, name: str | None = None, reader=None) -> GgufBase:
    """Describe a GGUF model file (header and tensor table only; no weights are read). Pass a GGUFReader
    of it if there is one: parsing a large vocabulary takes seconds."""
    reader = reader or gguf_module().GGUFReader(str(path))
    arch = field_value(reader, "general.architecture", "")
    n_layers = int(field_value(reader, f"{arch}.block_count", 0) or 0)
    n_head = field_value(reader, f"{arch}.attention.head_count", 0)
    n_head_kv = field_value(reader, f"{arch}.attention.head_count_kv", n_head)
    n_head = int(n_head[0] if isinstance(n_head, list) else n_head or 0)
    n_head_kv = int(n_head_kv[0] if isinstance(n_head_kv, list) else n_head_kv or n_head)
    tensors, parameters = {}, 0
    for t in reader.tensors:
        parameters += int(t.n_elements)
        if len(t.shape) == 2 and t.name.endswith(".weight"):
            tensors[t.name[: -len(".weight")]] = (int(t.shape[0]), int(t.shape[1]))
    names = NameMap(arch, n_layers)
    layers = {}
    for gname, (n_in, n_out) in tensors.items():
        hf = names.to_hf(gname)
        if hf is None:
            continue
        layers[hf] = Layer("embedding", n_out, n_in) if gname == "token_embd" else Layer("linear", n_in, n_out)
    digest = hashlib.sha1(json.dumps([arch, n_head, n_head_kv, sorted(tensors.items())]).encode()).hexdigest()[:12]
    base = GgufBase(path=Path(path), arch=arch, n_layers=n_layers, n_head=n_head, n_head_kv=n_head_kv,
                    tensors=tensors, names=names, fingerprint=digest, parameters=parameters)
    base.description = BaseDescription(name=display_name(name or Path(path).name), model_type=arch, layers=layers,
                                       num_layers=n_layers)
    return base


# -- PEFT → GGUF LoRA ------------------------------------------------------------------------------------
def peft_scale(config: dict, module: str, rank: int, weight: float = 1.0) -> float:
    """PEFT's scaling of one module: alpha/r (alpha/sqrt(r) with rsLoRA); alpha_pattern picks per module, matched
    by PEFT's own pattern rule. `rank` is the module's real rank (the tensor's, which rank_pattern set). With a
    stack `weight`, weight * alpha / r in the order PEFT's `set_scale` computes it (so a merge matches PEFT's)."""
    patterns = config.get("alpha_pattern") or {}
    alpha = config.get("lora_alpha", config["r"])
    if patterns:  # PEFT's own matching rule; importing PEFT costs seconds, so only when there is a pattern
        from peft.utils.other import get_pattern_key

        alpha = patterns.get(get_pattern_key(list(patterns), module), alpha)
    return weight * alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)


def lora_pairs(files: AdapterFiles, state: dict, base: GgufBase, ignored=()) -> list[tuple]:
    """(GGUF tensor name, A (r, in), B (out, r), PEFT scale) for each adapted module, in GGUF layout
    (B already permuted for q/k). Refuses what llama.cpp cannot run: DoRA, embedding LoRAs, saved modules."""
    groups: dict[str, dict] = {}
    for key, tensor in state.items():
        module, part = split_key(key)
        leaf = module.rsplit(".", 1)[-1]
        if leaf in ignored:
            continue
        if part == "lora_magnitude_vector":
            raise BadInput(f"{files.name}: a DoRA adapter; llama.cpp runs plain LoRA only "
                               "(use it on the transformers loader)")
        if part in ("lora_embedding_A", "lora_embedding_B"):
            raise BadInput(f"{files.name}: LoRA on the embedding layer ({module}) cannot run on llama.cpp")
        if not part:
            raise BadInput(f"{files.name}: saves whole module {module} (modules_to_save), which llama.cpp "
                               "adapters cannot carry")
        if key.endswith(".bias"):
            raise BadInput(f"{files.name}: has LoRA biases (lora_bias=True, {module}), which llama.cpp adapters "
                           "cannot carry; use it on the transformers loader or merge it there (export safetensors)")
        groups.setdefault(module, {})[part] = tensor
    pairs = []
    for module, parts in sorted(groups.items()):
        gname = base.names.to_gguf(module)
        if gname is None or gname not in base.tensors:
            raise BadInput(f"{files.name}: {module} has no tensor in the GGUF base {base.path.name}")
        a = parts["lora_A"].float().numpy()
        b = parts["lora_B"].float().numpy()
        pairs.append((gname, a, base.permute_b(gname, b), peft_scale(files.config, module, a.shape[0])))
    if not pairs:
        raise BadInput(f"{files.name}: none of its targets exist in {base.path.name}")
    return pairs


OUTTYPES = ("f32", "f16", "q8_0")  # what a GGUF LoRA's tensors may be stored as (llama.cpp's converter's choices)


def stack_pairs(stack: list[tuple[list[tuple], float]]) -> list[tuple]:
    """One adapter's (GGUF name, A, B, scale) pairs for a weighted stack [(pairs, weight), ...]: per tensor, the
    factors are concatenated along the rank with each weight*scale folded into its B, so B_cat @ A_cat equals
    sum_i w_i * scale_i * B_i @ A_i exactly (PEFT's `cat` combination); the pair's own scale is 1."""
    merged: dict[str, tuple[list, list]] = {}
    for pairs, weight in stack:
        for gname, a, b, scale in pairs:
            a_list, b_list = merged.setdefault(gname, ([], []))
            a_list.append(a)
            b_list.append(b * (weight * scale))
    return [(g, np.concatenate(a_list, axis=0), np.concatenate(b_list, axis=1), 1.0)
            for g, (a_list, b_list) in merged.items()]


def _stored(gguf, data: np.ndarray, outtype: str):
    """(array, tensor type) of a LoRA factor in `outtype`. Q8_0 packs rows in blocks of 32 values: a factor
    whose rows are not a multiple of that (B of a small rank) falls back to F16, as llama.cpp's converter does."""
    if outtype == "q8_0":
        try:
            return gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
        except gguf.QuantError:
            outtype = "f16"
    if outtype == "f16":
        return data.astype(np.float16), gguf.GGMLQuantizationType.F16
    return data.astype(np.float32), gguf.GGMLQuantizationType.F32


def write_gguf_lora(pairs: list[tuple], base: GgufBase, out: Path, name: str, alpha: float,
                    base_model: str = "", outtype: str = "f32") -> Path:
    """Write (GGUF name, A (r, in), B (out, r), scale) pairs as a GGUF LoRA for `base`. llama.cpp scales each
    pair by adapter.lora.alpha / its rank, one alpha for the whole file; where a pair's intended scale differs
    (rsLoRA, alpha_pattern, rank_pattern, folded stack weights) the difference is folded into its B."""
    gguf = gguf_module()
    if outtype not in OUTTYPES:
        raise BadInput(f"--outtype {outtype!r} is not one of: {', '.join(OUTTYPES)}")
    writer = gguf.GGUFWriter(str(out), base.arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
    writer.add_name(name)
    if base_model:
        writer.add_base_model_count(1)
        writer.add_base_model_name(0, str(base_model))
    for gname, a, b, scale in pairs:
        b = b * (scale / (alpha / a.shape[0]))
        for part, data in (("lora_a", a), ("lora_b", b)):
            data, kind = _stored(gguf, np.ascontiguousarray(data, dtype=np.float32), outtype)
            writer.add_tensor(f"{gname}.weight.{part}", data, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def convert_peft(files: AdapterFiles, state: dict, base: GgufBase, out: Path, ignored=(),
                 outtype: str = "f32") -> Path:
    """Write a GGUF LoRA of a PEFT adapter for `base` (f32 by default: adapters are small, and it keeps the
    result equal to PEFT's)."""
    return write_gguf_lora(lora_pairs(files, state, base, ignored), base, out, files.name,
                           float(files.config.get("lora_alpha", files.config["r"])),
                           files.config.get("base_model_name_or_path") or "", outtype)


def cached_conversion(files: AdapterFiles, state: dict, base: GgufBase, ignored=()) -> Path:
    """The GGUF LoRA of `files` for `base`, converted once and kept beside the adapter as
    adapter.<base fingerprint>.<source fingerprint>.gguf (a changed adapter gets a new file; the stale one
    is removed). A read-only adapters folder falls back to a cache folder under the temp dir."""
    source = hashlib.sha1(repr((files.signature(), sorted(ignored))).encode()).hexdigest()[:12]
    name = f"adapter.{base.fingerprint}.{source}.gguf"
    for folder in (Path(files.path), Path(tempfile.gettempdir()) / "lora-deck-gguf" / files.name):
        if (folder / name).is_file():
            return folder / name
    for folder in (Path(files.path), Path(tempfile.gettempdir()) / "lora-deck-gguf" / files.name):
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if not os.access(folder, os.W_OK):  # a read-only adapters folder: the next place
            continue
        with write_into_place(folder / name, folder=False) as part:
            convert_peft(files, state, base, part, ignored)
            for stale in folder.glob(f"adapter.{base.fingerprint}.*.gguf"):
                stale.unlink(missing_ok=True)
        return folder / name
    raise BadInput(f"{files.name}: nowhere to write its GGUF conversion (adapter folder and temp dir are "
                       "read-only)")


# -- GGUF LoRA files in the loras folder ----------------------------------------------------------------
class GgufAdapterFiles(AdapterFiles):
    """An adapter that is a GGUF LoRA file (no adapter_config.json): its signature is the file's."""

    def signature(self) -> tuple:
        st = self.weights.stat()
        return ((self.weights.name, st.st_mtime_ns, st.st_size),)


def is_gguf_lora(file: Path) -> bool:
    try:
        reader = gguf_module().GGUFReader(str(file))
    except Exception:
        return False
    return field_value(reader, "general.type") == "adapter" and field_value(reader, "adapter.type") == "lora"


def find_gguf_lora(path: Path) -> Path | None:
    """The GGUF LoRA of an adapter entry: the file itself, or the one GGUF LoRA inside a folder."""
    path = Path(path)
    if path.is_file():
        return path if path.suffix == ".gguf" and is_gguf_lora(path) else None
    found = [f for f in sorted(path.glob("*.gguf")) if is_gguf_lora(f)] if path.is_dir() else []
    return found[0] if len(found) == 1 else None


def _gguf_lora_tensors(reader) -> tuple[str, dict]:
    """(architecture, {GGUF base name: {"lora_a": tensor, "lora_b": tensor}}) of a GGUF LoRA reader."""
    arch = field_value(reader, "general.architecture", "")
    pairs: dict[str, dict] = {}
    for t in reader.tensors:
        m = re.match(r"^(.*)\.weight\.(lora_a|lora_b)$", t.name)
        if m:
            pairs.setdefault(m.group(1), {})[m.group(2)] = t
    return arch, pairs


def read_gguf_adapter(path: Path, name: str | None = None) -> GgufAdapterFiles:
    """An AdapterFiles for a GGUF LoRA, with a PEFT-like config (r, alpha, targets) read off the file."""
    file = find_gguf_lora(path)
    name = name or Path(path).name
    if file is None:
        raise BadInput(f"{name}: not a GGUF LoRA (a .gguf with general.type=adapter, adapter.type=lora)")
    reader = gguf_module().GGUFReader(str(file))
    arch, pairs = _gguf_lora_tensors(reader)
    n_blocks = 1 + max((int(m.group(1)) for g in pairs if (m := _BLK.match(g))), default=0)
    names = NameMap(arch, n_blocks)
    ranks = {}
    for gname, parts in pairs.items():
        hf = names.to_hf(gname)
        if hf is None or set(parts) != {"lora_a", "lora_b"}:
            raise BadInput(f"{name}: GGUF tensor {gname} is not a complete LoRA pair of a known layer")
        ranks[hf] = int(parts["lora_a"].shape[1])
    if not ranks:
        raise BadInput(f"{name}: {file.name} holds no LoRA tensors")
    r = max(ranks.values())
    config = {"peft_type": "LORA", "r": r, "lora_alpha": float(field_value(reader, "adapter.lora.alpha", 0) or r),
              "target_modules": sorted({m.rsplit(".", 1)[-1] for m in ranks}),
              "rank_pattern": {re.escape(m): v for m, v in ranks.items() if v != r},
              "base_model_name_or_path": field_value(reader, "general.base_model.0.name", "") or "",
              "gguf_architecture": arch}
    folder = file.parent if Path(path).is_dir() else Path(path).parent
    return GgufAdapterFiles(name=name, path=folder, config=config, weights=file, format="gguf",
                            size=file.stat().st_size)


def load_gguf_state(files: AdapterFiles) -> dict:
    """The GGUF LoRA's tensors as PEFT-named torch tensors (A: (r, in), B: (out, r)), for the report."""
    import torch  # heavy: only the report of a GGUF LoRA needs tensors

    gguf = gguf_module()
    reader = gguf.GGUFReader(str(files.weights))
    arch, pairs = _gguf_lora_tensors(reader)
    n_blocks = 1 + max((int(m.group(1)) for g in pairs if (m := _BLK.match(g))), default=0)
    names = NameMap(arch, n_blocks)
    state = {}
    for gname, parts in pairs.items():
        hf = names.to_hf(gname)
        for part, peft_part in (("lora_a", "lora_A"), ("lora_b", "lora_B")):
            t = parts[part]
            data = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
            data = data.reshape(int(t.shape[1]), int(t.shape[0]))
            if not np.isfinite(data).all():
                raise BadInput(f"{files.name}: non-finite weights (NaN or Inf) in {t.name}")
            state[f"base_model.model.{hf}.{peft_part}.weight"] = torch.from_numpy(data.copy())
    return state
