"""Training benchmark on the embedded SmolLM2-135M-Instruct: our trainer (`python -m webui train`) vs a
plain TRL SFTTrainer + PEFT script (bench/trl_reference.py) with the same base, text, LoRA settings
(r=16, alpha=32, all-linear), batch, cutoff and steps, each in its own process, alternated.

- train_vs_trl: training tokens/s (steady state: from the second logged step to the last);
- train_peak_rss_vs_trl: peak resident memory of the training process (lower is better).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from bench.common import Row, side_by_side
from webui import embedded

ROWS = ("train_vs_trl", "train_peak_rss_vs_trl")
ROOT = Path(__file__).resolve().parent.parent
TEXT = ("The lighthouse keeper climbed the stairs every evening to light the lamp. Ships passed in the "
        "night, and the sea kept its own counsel. ") * 200


def _run(cmd: list[str]) -> tuple[str, float]:
    """(stdout, peak RSS in MB) of a child process."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise RuntimeError(f"{cmd[:4]} failed with {proc.returncode}")
    return out, usage.ru_maxrss / 1024


def run(models_dir: Path, quick: bool = False, only: set | None = None) -> list[Row]:
    reps = 1 if quick else 2
    steps, batch, cutoff = (6, 2, 128) if quick else (12, 4, 128)
    base = embedded.ensure_transformers_folder(models_dir)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "text.txt").write_text(TEXT)
        counter = iter(range(1000))
        figures = {"ours": [], "trl": []}

        def ours():
            name = f"bench{next(counter)}"
            cfg = {"base_model": str(base), "output": name, "dataset": {"path": str(tmp / "text.txt"), "format": "raw",
                                                                        "eval_fraction": 0, "overlap": 32},
                   "lora": {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": "all-linear"},
                   "training": {"max_steps": steps, "batch_size": batch, "cutoff_len": cutoff, "save_steps": 10_000}}
            (tmp / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
            _, rss = _run([sys.executable, "-m", "webui", "train", "--config", str(tmp / f"{name}.yaml"),
                           "--models-dir", str(models_dir), "--loras-dir", str(tmp / "loras"),
                           "--runs-dir", str(tmp / "runs")])
            rows = [json.loads(x) for x in (tmp / "runs" / name / "metrics.jsonl").read_text().splitlines()]
            rows = [r for r in rows if "tokens" in r]
            tps = (rows[-1]["tokens"] - rows[0]["tokens"]) / (rows[-1]["time"] - rows[0]["time"])
            figures["ours"].append(rss)
            return tps

        def trl():
            out, rss = _run([sys.executable, str(ROOT / "bench" / "trl_reference.py"), str(base),
                             str(tmp / "text.txt"), str(steps), str(batch), str(cutoff), str(tmp / "trl")])
            figures["trl"].append(rss)
            return json.loads(out.strip().splitlines()[-1])["tokens_per_s"]

        ours_tps, trl_tps = side_by_side(ours, trl, reps)
        note = f"{steps} steps, batch {batch}, cutoff {cutoff}, r=16 all-linear, CPU"
        rows = []
        if not only or ROWS[0] in only:
            rows.append(Row(ROWS[0], ours_tps, trl_tps, "tokens/s", True, note))
        if not only or ROWS[1] in only:
            rows.append(Row(ROWS[1], max(figures["ours"]), max(figures["trl"]), "MB", False, "peak RSS; " + note))
    return rows
