"""Merging, exporting and loading at a real size (`python -m bench --big`), on bench/big.py's synthetic model of
TinyLlama-1.1B's shape (W = the base's bf16 safetensors on disk, ≈ 2.2 GB) with a random rank-16 LoRA on every
linear layer, each beside the plain tool doing the same job in the same run. Each row's ratio is the peak resident
memory of the whole child process over W (lower is better); the plain tool's figure and both times are in its note.

- big_export_peak_rss.safetensors: `export --format safetensors` vs PEFT `merge_and_unload` on the base loaded in
  bf16, then `save_pretrained` (goal ≤ 1.2, and no more than PEFT's).
- big_export_peak_rss.gguf_q8_0: `export --format gguf --quant Q8_0` vs llama.cpp's convert_hf_to_gguf.py
  --outtype q8_0 of the merged folder (goal ≤ 1.0).
- big_export_peak_rss.gguf_q4_k_m: `export --format gguf --quant Q4_K_M` vs convert_hf_to_gguf.py --outtype bf16
  of the merged folder, then llama.cpp's quantizer (the larger of the two peaks, the sum of the times; goal ≤ 1.0).
- big_export_peak_rss.gguf_lora: `export --format gguf-lora` for the base's Q8_0 GGUF vs llama.cpp's
  convert_lora_to_gguf.py (goal ≤ 0.5).
- big_load_peak_rss.transformers: `--loader transformers --dtype auto`, load and 4 greedy tokens, vs plain
  transformers `from_pretrained(dtype=bfloat16)` and the same tokens (goal ≤ 1.3 where auto keeps bf16).
- big_load_peak_rss.llamacpp: `--loader llamacpp` on the Q8_0 GGUF, load and 4 tokens, vs llama-cpp-python's
  `Llama` doing the same.
- big_hot_swap_vs_reload.{transformers,llamacpp}: seconds to reload the base over seconds to switch between two
  cached rank-16 all-linear adapters on it (higher is better); llama.cpp on the Q8_0 GGUF.

llama.cpp's converters live only in its source tree: they are taken from the llama-cpp-python sdist this project
pins (PyPI), with the gguf-py beside them, into ~/.cache/loradeck/llama-cpp-tools-VERSION. The synthetic model's
tokenizer (a small byte-level BPE, webui/testing/tiny_models.build_tokenizer) is unknown to convert_hf_to_gguf.py's
pre-tokenizer table and its SentencePiece attempt needs a package we do not install, so it is told the tokenizer is
GPT-2's, which it is; nothing that touches tensors is changed.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

from bench.big import CACHE, LINEAR, RANK, SHAPE, models
from bench.common import ROOT, Row, child_peak_rss
from webui.backends.machine import cpu_computes_bf16

ROWS = ("big_export_peak_rss.safetensors", "big_export_peak_rss.gguf_q8_0", "big_export_peak_rss.gguf_q4_k_m",
        "big_export_peak_rss.gguf_lora", "big_load_peak_rss.transformers", "big_load_peak_rss.llamacpp",
        "big_hot_swap_vs_reload.transformers", "big_hot_swap_vs_reload.llamacpp")
LORAS = CACHE / "loras"


def _adapter(name: str, seed: int) -> Path:
    """A random rank-16 PEFT LoRA on every linear layer of the big base, written once."""
    from safetensors.torch import save_file

    out = LORAS / name
    if out.is_dir():
        return out
    h, m, kv = SHAPE["hidden_size"], SHAPE["intermediate_size"], SHAPE["hidden_size"] // 8
    dims = {"q_proj": (h, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, h), "gate_proj": (m, h),
            "up_proj": (m, h), "down_proj": (h, m)}
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(SHAPE["num_hidden_layers"]):
        for module in LINEAR:
            out_dim, in_dim = dims[module.rsplit(".", 1)[-1]]
            key = f"base_model.model.model.layers.{i}.{module}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(RANK, in_dim, generator=gen) * 0.02
            tensors[f"{key}.lora_B.weight"] = torch.randn(out_dim, RANK, generator=gen) * 0.02
    tmp = out.with_name(name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(tmp / "adapter_model.safetensors"))
    (tmp / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": RANK, "lora_alpha": RANK, "lora_dropout": 0.0,
        "target_modules": [m.rsplit(".", 1)[-1] for m in LINEAR], "bias": "none", "fan_in_fan_out": False,
        "base_model_name_or_path": "tiny-llama-1.1b-shape"}, indent=2))
    tmp.rename(out)
    return out


def _with_tokenizer(base: Path) -> Path:
    """The big base needs a tokenizer to be written as GGUF or loaded: the tiny byte-level BPE, added once."""
    if not (base / "tokenizer.json").is_file():
        from webui.testing.tiny_models import build_tokenizer

        build_tokenizer().save_pretrained(str(base))
    return base


def _tools() -> Path:
    """llama.cpp's converter scripts and their gguf-py, from the pinned llama-cpp-python sdist (downloaded once)."""
    version = re.search(r'"llama-cpp-python==([^"]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    tools = CACHE.parent / f"llama-cpp-tools-{version}"
    if (tools / "convert_hf_to_gguf.py").is_file():
        return tools
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-binary", ":all:", "--no-deps",
                        f"llama-cpp-python=={version}", "-d", tmp], check=True)
        prefix = f"llama_cpp_python-{version}/vendor/llama.cpp/"
        staging = tools.with_name(tools.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        with tarfile.open(next(Path(tmp).glob("*.tar.gz"))) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(prefix) and m.isfile() and
                       (m.name.endswith(".py") and "/" not in m.name[len(prefix):].replace("conversion/", "", 1)
                        or m.name.startswith(prefix + "gguf-py/") or m.name.startswith(prefix + "conversion/"))]
            for m in members:
                m.name = m.name[len(prefix):]
            tar.extractall(staging, members=members, filter="data")
        staging.rename(tools)
    return tools


# llama.cpp's converter, told that the synthetic tokenizer is GPT-2's (its hash is not in llama.cpp's table, and
# it would try SentencePiece first, which is not installed); `script`: convert_hf_to_gguf or convert_lora_to_gguf
_CONVERT = """import sys; sys.path[:0] = [{tools!r}, {tools!r} + '/gguf-py']
import conversion.base as b
def no(self, *a, **k): raise FileNotFoundError('not this tokenizer')
b.TextModel.get_vocab_base_pre = lambda self, tokenizer: 'gpt-2'
b.TextModel._set_vocab_sentencepiece = b.TextModel._set_vocab_llama_hf = no
import runpy
sys.argv = ['{script}.py'] + {args!r}
runpy.run_path({tools!r} + '/{script}.py', run_name='__main__')"""
_PEFT_MERGE = """import sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
PeftModel.from_pretrained(model, sys.argv[2]).merge_and_unload().save_pretrained(sys.argv[3])
AutoTokenizer.from_pretrained(sys.argv[1]).save_pretrained(sys.argv[3])"""
_QUANTIZE = """import sys
from pathlib import Path
from webui.export.gguf_writer import quantize
quantize(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3])"""
_ENGINE_LOAD = """import sys
from webui.engine import Engine
from webui.options.config import GenerationParams, ModelSpec
engine = Engine(__import__('pathlib').Path(sys.argv[1]).parent, __import__('pathlib').Path(sys.argv[1]).parent)
info = engine.load(ModelSpec(model=sys.argv[1], loader=sys.argv[2], dtype=sys.argv[3])).info
engine.generate('Hello there', GenerationParams(max_new_tokens=4, temperature=0))
print('dtype:', info.dtype)"""
_PLAIN_HF = """import sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False)"""
_PLAIN_LLAMA = """import sys, llama_cpp
llm = llama_cpp.Llama(sys.argv[1], n_ctx=4096, flash_attn=True, verbose=False)  # our loader's defaults
llm('Hello there', max_tokens=4, temperature=0)"""


def _measured(cmd: list[str]) -> tuple[float, float, str]:
    """(peak RSS in bytes, seconds, stdout) of a child."""
    start = time.perf_counter()
    out, peak_mb = child_peak_rss(cmd)
    return peak_mb * 2**20, time.perf_counter() - start, out


def _py(code: str, *args) -> list[str]:
    return [sys.executable, "-c", code, *map(str, args)]


def _row(name: str, ours: tuple, ref: tuple, w: int, goal: str, tool: str, extra: str = "") -> Row:
    """ours = our peak in GB, reference = W in GB: the row's ratio is our peak RSS / W (INTERFACES.md); the plain
    tool's figure is in the note."""
    return Row(name, ours[0] / 1e9, w / 1e9, "GB", False,
               f"peak RSS / W; ours {ours[0] / w:.2f} W ({ours[0] / 1e9:.2f} GB) in {ours[1]:.0f} s, {tool} "
               f"{ref[0] / w:.2f} W ({ref[0] / 1e9:.2f} GB) in {ref[1]:.0f} s; goal {goal}{extra}")


def run(models_dir: Path, quick: bool = False, only: set | None = None) -> list[Row]:
    base, _ = models()
    base = _with_tokenizer(base)
    lora = _adapter("lora-r16", 2)
    w = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    want = (lambda n: only is None or n in only)
    export = [sys.executable, "-m", "webui", "export", "--models-dir", str(CACHE), "--loras-dir", str(LORAS)]
    rows = []
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        tmp = Path(tmp)
        merged = tmp / "peft-merged"
        if want("big_export_peak_rss.safetensors") or want("big_export_peak_rss.gguf_q8_0") \
                or want("big_export_peak_rss.gguf_q4_k_m"):
            ref = _measured(_py(_PEFT_MERGE, base, lora, merged))
            ours = _measured(export + ["--model", str(base), "--lora", lora.name, "--format", "safetensors",
                                       "--out", str(tmp / "ours-merged")])
            shutil.rmtree(tmp / "ours-merged")
            if want("big_export_peak_rss.safetensors"):
                rows.append(_row("big_export_peak_rss.safetensors", ours, ref, w, "≤ 1.2 and ≤ PEFT's",
                                 "PEFT merge_and_unload (bf16) + save_pretrained"))
        tools = str(_tools()) if any(want(n) for n in ROWS[1:4]) else ""
        for quant, row in (("Q8_0", "big_export_peak_rss.gguf_q8_0"), ("Q4_K_M", "big_export_peak_rss.gguf_q4_k_m")):
            if not want(row):
                continue
            ours = _measured(export + ["--model", str(base), "--lora", lora.name, "--format", "gguf", "--quant", quant,
                                       "--out", str(tmp / f"ours.{quant}.gguf")])
            (tmp / f"ours.{quant}.gguf").unlink()
            if quant == "Q8_0":
                ref = _measured(_py(_CONVERT.format(tools=tools, script="convert_hf_to_gguf", args=[
                    str(merged), "--outtype", "q8_0", "--outfile", str(tmp / "ref.gguf")])))
                tool = "convert_hf_to_gguf.py --outtype q8_0 of the merged folder"
            else:
                conv = _measured(_py(_CONVERT.format(tools=tools, script="convert_hf_to_gguf", args=[
                    str(merged), "--outtype", "bf16", "--outfile", str(tmp / "ref.bf16.gguf")])))
                quantized = _measured(_py(_QUANTIZE, tmp / "ref.bf16.gguf", tmp / "ref.gguf", quant))
                ref = (max(conv[0], quantized[0]), conv[1] + quantized[1])
                (tmp / "ref.bf16.gguf").unlink()
                tool = "convert_hf_to_gguf.py --outtype bf16, then llama.cpp's quantizer"
            (tmp / "ref.gguf").unlink()
            rows.append(_row(row, ours, ref, w, "≤ 1.0", tool))
        gguf_base = CACHE / "tiny-llama-1.1b-shape.Q8_0.gguf"
        if (want("big_export_peak_rss.gguf_lora") or want("big_load_peak_rss.llamacpp")
                or want("big_hot_swap_vs_reload.llamacpp")) and not gguf_base.is_file():
            subprocess.run(export + ["--model", str(base), "--format", "gguf", "--quant", "Q8_0", "--out",
                                     str(gguf_base)], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
        if want("big_export_peak_rss.gguf_lora"):
            ours = _measured(export + ["--model", str(gguf_base), "--lora", lora.name, "--format", "gguf-lora",
                                       "--out", str(tmp / "ours-lora.gguf")])
            ref = _measured(_py(_CONVERT.format(tools=str(_tools()), script="convert_lora_to_gguf", args=[
                "--base", str(base), "--outtype", "f32", "--outfile", str(tmp / "ref-lora.gguf"), str(lora)])))
            rows.append(_row("big_export_peak_rss.gguf_lora", ours, ref, w, "≤ 0.5", "convert_lora_to_gguf.py"))
        if want("big_load_peak_rss.transformers"):
            ours = _measured(_py(_ENGINE_LOAD, base, "transformers", "auto"))
            ref = _measured(_py(_PLAIN_HF, base))
            bf16 = _measured(_py(_ENGINE_LOAD, base, "transformers", "bfloat16"))  # what auto keeps on a bf16 CPU
            rows.append(_row("big_load_peak_rss.transformers", ours, ref, w, "≤ 1.3 where auto keeps bf16",
                             "transformers from_pretrained(bf16)",
                             f"; auto loaded {ours[2].strip().removeprefix('dtype: ')} here (this CPU "
                             f"{'computes' if cpu_computes_bf16() else 'does not compute'} bf16); ours with "
                             f"--dtype bfloat16, what auto keeps on a bf16 CPU: {bf16[0] / w:.2f} W"))
        if want("big_load_peak_rss.llamacpp"):
            ours = _measured(_py(_ENGINE_LOAD, gguf_base, "llamacpp", "auto"))
            ref = _measured(_py(_PLAIN_LLAMA, gguf_base))
            rows.append(_row("big_load_peak_rss.llamacpp", ours, ref, w, "as llama-cpp-python's",
                             "llama_cpp.Llama (n_ctx 4096)",
                             f" (the Q8_0 GGUF: {gguf_base.stat().st_size / 1e9:.2f} GB; "
                             "ours also holds the continuous batch's KV cache, up to 1 GiB, and imports torch)"))
    if want("big_hot_swap_vs_reload.transformers"):
        rows.append(_hot_swap(base, "transformers", quick))
    if want("big_hot_swap_vs_reload.llamacpp"):
        rows.append(_hot_swap(gguf_base, "llamacpp", quick))
    return rows


def _hot_swap(base: Path, loader: str, quick: bool) -> Row:
    from bench.common import hot_swap_vs_reload
    from webui.engine import Engine
    from webui.options.config import ModelSpec

    _adapter("A", 3)
    _adapter("B", 4)
    spec = ModelSpec(model=str(base), loader=loader, dtype="bfloat16" if loader == "transformers" else "auto")
    engine = Engine(CACHE, LORAS)
    engine.load(spec)
    engine.set_adapters({"A": 1.0})
    engine.set_adapters({"B": 1.0})  # both cached
    swap, reload = hot_swap_vs_reload(engine, CACHE, LORAS, spec, 2 if quick else 3)
    engine.unload()
    what = "bf16 base" if loader == "transformers" else "the Q8_0 GGUF, adapters converted to GGUF LoRAs once"
    return Row(f"big_hot_swap_vs_reload.{loader}", reload / swap, 1.0, "x", True,
               f"reload {reload:.1f} s / switch between two rank-{RANK} all-linear adapters {swap * 1000:.1f} ms "
               f"({what}, median)")
