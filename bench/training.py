"""Training benchmark on the embedded SmolLM2-135M-Instruct: our trainer (`python -m webui train`) vs a
plain TRL SFTTrainer + PEFT script (bench/trl_reference.py) with the same base, text, LoRA settings
(r=16, alpha=32, all-linear), batch, cutoff and steps, each in its own process, alternated.

- train_vs_trl: training tokens/s (steady state: from the second logged step to the last);
- train_peak_rss_vs_trl: peak resident memory of the training process (lower is better).
  Both rows run each program with its defaults, as its user would: TRL's SFTConfig checkpoints every layer and
  computes in bf16 autocast; ours picks bf16 where the hardware computes it, checkpoints every 2nd layer and makes
  the loss a slice at a time. The note gives ours with TRL's settings and ours without checkpointing too;
- train_qlora_nf4_vs_float: tokens/s of QLoRA (training.quantization nf4) / the float base; peak RSS in the note;
- train_ddp2_vs_single: tokens/s of 2 processes (DDP, batch 2 each) / 1 process (batch 4): the same global batch;
- train_dpo_peak_rss_vs_sft: peak RSS of a DPO run (method dpo, 64 pairs) / an SFT run on the same base, LoRA
  settings and sequences per step (the pairs' chosen replies as chat records; a DPO batch of N pairs is 2N
  sequences, chosen and rejected): DPO's reference is the base with the adapter off, so no second model is held.
  The note gives DPO at the same batch_size too, against SFT at the same and at twice the batch.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import yaml

from bench.common import Row, child_peak_rss, side_by_side
from webui.backends import embedded
from webui.training import precision

ROWS = ("train_vs_trl", "train_peak_rss_vs_trl", "train_qlora_nf4_vs_float", "train_ddp2_vs_single",
        "train_dpo_peak_rss_vs_sft")
ROOT = Path(__file__).resolve().parent.parent
TEXT = ("The lighthouse keeper climbed the stairs every evening to light the lamp. Ships passed in the "
        "night, and the sea kept its own counsel. ") * 200


def run(models_dir: Path, quick: bool = False, only: set | None = None) -> list[Row]:
    reps = 1 if quick else 2
    steps, batch, cutoff = (6, 2, 128) if quick else (12, 4, 128)
    base = embedded.ensure_transformers_folder(models_dir)
    wanted = [r for r in ROWS if not only or r in only]
    note = f"{steps} steps, batch {batch}, cutoff {cutoff}, r=16 all-linear, CPU"
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "text.txt").write_text(TEXT)
        counter = iter(range(1000))
        rss: dict[str, list[float]] = {}

        pairs = [{"prompt": [{"role": "user", "content": f"Tell me about thing number {i}."}],
                  "chosen": [{"role": "assistant", "content": f"MOO! said the cow. Thing {i} is {TEXT[:200]}"}],
                  "rejected": [{"role": "assistant", "content": f"BAA! said the sheep. Thing {i} is {TEXT[:200]}"}]}
                 for i in range(64)]
        (tmp / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
        (tmp / "chosen.jsonl").write_text("".join(json.dumps({"messages": p["prompt"] + p["chosen"]}) + "\n"
                                                  for p in pairs))
        datasets = {"raw": {"path": str(tmp / "text.txt"), "format": "raw", "eval_fraction": 0, "overlap": 32},
                    "sft": {"path": str(tmp / "chosen.jsonl"), "format": "chat", "eval_fraction": 0},
                    "dpo": {"path": str(tmp / "pairs.jsonl"), "format": "preference", "eval_fraction": 0}}

        def ours(key: str, num_processes: int = 1, data: str = "raw", **training):
            """tokens/s of one run of ours; its peak RSS (its largest process) goes to rss[key]."""
            def measure():
                name = f"bench{next(counter)}"
                cfg = {"base_model": str(base), "output": name, "dataset": datasets[data],
                       "method": "dpo" if data == "dpo" else "sft",
                       "lora": {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": "all-linear"},
                       "training": {"max_steps": steps, "batch_size": batch, "cutoff_len": cutoff,
                                    "save_steps": 10_000, "num_processes": num_processes, **training}}
                (tmp / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
                _, peak = child_peak_rss([sys.executable, "-m", "webui", "train", "--config", str(tmp / f"{name}.yaml"),
                                "--models-dir", str(models_dir), "--loras-dir", str(tmp / "loras"),
                                "--runs-dir", str(tmp / "runs")])
                metrics = [json.loads(x) for x in (tmp / "runs" / name / "metrics.jsonl").read_text().splitlines()]
                metrics = [r for r in metrics if "tokens" in r]
                rss.setdefault(key, []).append(peak)
                if len(metrics) < 2:  # a run whose batches are not counted in tokens (not the rows that time)
                    return 0.0
                return (metrics[-1]["tokens"] - metrics[0]["tokens"]) / (metrics[-1]["time"] - metrics[0]["time"])
            return measure

        def trl():
            out, peak = child_peak_rss([sys.executable, str(ROOT / "bench" / "trl_reference.py"), str(base),
                              str(tmp / "text.txt"), str(steps), str(batch), str(cutoff), str(tmp / "trl")])
            rss.setdefault("trl", []).append(peak)
            return json.loads(out.strip().splitlines()[-1])["tokens_per_s"]

        if {"train_vs_trl", "train_peak_rss_vs_trl"} & set(wanted):
            # each as its user runs it: TRL's SFTConfig defaults (every layer checkpointed, bf16 autocast) and ours
            ours_tps, trl_tps = side_by_side(ours("default"), trl, reps)
            trl_mb = max(rss["trl"])
            others = []
            for key, label, settings in (
                    ("same", "with TRL's settings (every layer checkpointed, bf16)",
                     dict(checkpoint_every=1, precision="bf16")),
                    ("plain", "without checkpointing", dict(gradient_checkpointing=False))):
                tps = ours(key, **settings)()
                others.append(f"ours {label}: {tps:.0f} tokens/s ({tps / trl_tps:.2f}x), {max(rss[key]):.0f} MB "
                              f"({max(rss[key]) / trl_mb:.2f}x)")
            chosen = precision.resolve("auto").name
            defaults = (f"each with its defaults (ours: precision auto = {chosen} here, every 2nd layer "
                        f"checkpointed, the loss in slices; TRL: every layer checkpointed, bf16 autocast); ")
            tail = "; " + "; ".join(others)
            if "train_vs_trl" in wanted:
                rows.append(Row("train_vs_trl", ours_tps, trl_tps, "tokens/s", True, defaults + note + tail))
            if "train_peak_rss_vs_trl" in wanted:
                rows.append(Row("train_peak_rss_vs_trl", max(rss["default"]), trl_mb, "MB", False,
                                "peak RSS, " + defaults + note + tail))
        if "train_qlora_nf4_vs_float" in wanted:
            nf4, flt = side_by_side(ours("nf4", quantization="nf4"), ours("float"), reps)
            rows.append(Row("train_qlora_nf4_vs_float", nf4, flt, "tokens/s", True,
                            f"peak RSS nf4 {max(rss['nf4']):.0f} MB vs float {max(rss['float']):.0f} MB "
                            f"({max(rss['nf4']) / max(rss['float']):.2f}x); bitsandbytes' CPU backend; " + note))
        if "train_ddp2_vs_single" in wanted:
            batch_of = batch
            ddp, single = side_by_side(ours("ddp2", num_processes=2, batch_size=max(1, batch_of // 2)),
                                       ours("single", batch_size=batch_of), reps)
            rows.append(Row("train_ddp2_vs_single", ddp, single, "tokens/s", True,
                            f"2 processes x batch {max(1, batch_of // 2)} (gloo, one core each) vs 1 process x "
                            f"batch {batch_of} on {os.cpu_count()} cores; " + note))
        if "train_dpo_peak_rss_vs_sft" in wanted:
            # a DPO batch of N pairs runs 2N sequences (chosen and rejected) through the model: the row compares the
            # same sequences per step; the note gives the same batch_size, against SFT with twice the batch too
            pairs_batch = max(1, batch // 2)
            side_by_side(ours("dpo", data="dpo", batch_size=pairs_batch), ours("sft", data="sft"), reps)
            ours("dpo_same", data="dpo")()
            ours("sft_double", data="sft", batch_size=2 * batch)()
            dpo_same, sft = max(rss["dpo_same"]), max(rss["sft"])
            rows.append(Row("train_dpo_peak_rss_vs_sft", max(rss["dpo"]), sft, "MB", False,
                            f"peak RSS of method dpo, batch {pairs_batch} pairs = {2 * pairs_batch} sequences, / sft, "
                            f"batch {batch}; at dpo batch {batch} pairs: {dpo_same:.0f} MB = {dpo_same / sft:.2f}x sft "
                            f"batch {batch}, {dpo_same / max(rss['sft_double']):.2f}x sft batch {2 * batch}; 64 chat "
                            f"pairs (sft: their chosen replies), same base and LoRA; " + note))
    return rows
