"""Benchmarks at a real size (`python -m bench --big`): a synthetic model of TinyLlama-1.1B's shape (22 layers,
hidden 2048, MLP 5632, 32 heads / 4 KV heads, vocabulary 32000; random bf16 weights in 2 safetensors shards,
W ≈ 2.2 GB on disk) and a fine-tune of it (every linear layer plus a random rank-16 change), built once,
tensor by tensor, and cached under ~/.cache/loradeck/bench-big (never in the repository).

- big_extract_peak_rss: peak resident memory of `python -m webui extract --base B --tuned T --rank 16` over W, the
  base's bytes on disk (lower is better; the goal is ≤ 1.5: one model's size, never both models whole). The
  extracted adapter's relative error is in the note: the change has rank 16, but the tuned weights are stored
  in bf16, whose rounding (full rank, ~2 % of this change) no rank-16 factor holds.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.common import Row, child_peak_rss

ROWS = ("big_extract_peak_rss",)
CACHE = Path(os.environ.get("LORADECK_BENCH_CACHE", Path.home() / ".cache" / "loradeck" / "bench-big"))
SHAPE = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
             num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048, rms_norm_eps=1e-5,
             tie_word_embeddings=False, architectures=["LlamaForCausalLM"], model_type="llama",
             torch_dtype="bfloat16")
LINEAR = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
          "mlp.up_proj", "mlp.down_proj")
RANK = 16


def _shapes() -> dict[str, tuple]:
    h, m, kv = SHAPE["hidden_size"], SHAPE["intermediate_size"], SHAPE["hidden_size"] // 8  # 4 of 32 heads
    out = {"model.embed_tokens.weight": (SHAPE["vocab_size"], h)}
    for i in range(SHAPE["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out.update({p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
                    p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
                    p + "mlp.gate_proj.weight": (m, h), p + "mlp.up_proj.weight": (m, h),
                    p + "mlp.down_proj.weight": (h, m), p + "input_layernorm.weight": (h,),
                    p + "post_attention_layernorm.weight": (h,)})
    out.update({"model.norm.weight": (h,), "lm_head.weight": (SHAPE["vocab_size"], h)})
    return out


def _write(folder: Path, tensor_of) -> None:
    """A 2-shard safetensors folder (with its index and config), one shard's tensors in memory at a time."""
    from safetensors.torch import save_file

    names = list(_shapes())
    half = len(names) // 2
    shards = {f"model-0000{i + 1}-of-00002.safetensors": part for i, part in enumerate((names[:half], names[half:]))}
    tmp = folder.with_name(folder.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for shard, part in shards.items():
        save_file({n: tensor_of(n) for n in part}, str(tmp / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, shard))
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (tmp / "config.json").write_text(json.dumps(SHAPE, indent=2))
    tmp.rename(folder)


def models() -> tuple[Path, Path]:
    """(base, tuned), built on first use."""
    from safetensors import safe_open

    base, tuned = CACHE / "tiny-llama-1.1b-shape", CACHE / "tiny-llama-1.1b-shape-tuned"
    shapes = _shapes()
    if not base.is_dir():
        gen = torch.Generator().manual_seed(0)
        _write(base, lambda n: (torch.randn(shapes[n], generator=gen) * 0.02).to(torch.bfloat16)
               if len(shapes[n]) == 2 else torch.ones(shapes[n], dtype=torch.bfloat16))
    if not tuned.is_dir():
        index = json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]
        gen = torch.Generator().manual_seed(1)

        def tensor_of(n: str) -> torch.Tensor:
            with safe_open(str(base / index[n]), "pt") as f:
                w = f.get_tensor(n)
            if any(n.endswith(m + ".weight") for m in LINEAR):  # + a rank-16 change, in float32, stored bf16
                b = torch.randn(w.shape[0], RANK, generator=gen) * 0.02
                a = torch.randn(RANK, w.shape[1], generator=gen) * 0.02
                w = (w.float() + b @ a).to(torch.bfloat16)
            return w

        _write(tuned, tensor_of)
    return base, tuned


def run(models_dir: Path, quick: bool = False, only: set | None = None) -> list[Row]:
    base, tuned = models()
    w = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    rows = []
    if only is None or "big_extract_peak_rss" in only:
        with tempfile.TemporaryDirectory() as loras:
            start = time.perf_counter()
            out, peak_mb = child_peak_rss([sys.executable, "-m", "webui", "extract", "--base", str(base), "--tuned",
                                   str(tuned), "--rank", str(RANK), "--loras-dir", loras, "--out", "extracted"])
            seconds = time.perf_counter() - start
        total = next((line for line in out.splitlines() if line.startswith("total:")), "total: ?")
        rows.append(Row("big_extract_peak_rss", peak_mb * 2**20 / 1e9, w / 1e9, "GB", False,
                        f"peak RSS of extract --rank {RANK} / the base's size on disk (goal ≤ 1.5); {seconds:.0f} s; "
                        f"{total}"))
    return rows
