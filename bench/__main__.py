"""Run the benchmarks and print ratios measured side by side in one run:

    .venv/bin/python -m bench [--only NAME...] [--quick]

Writes bench/results.json ({"machine", "date", "results": [...]}, the rows of INTERFACES.md); a full run
(no --only, no --quick) also rewrites bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODULES = ("bench.adapters_transformers", "bench.api_transformers", "bench.training", "bench.adapters_llamacpp", "bench.download",
           "bench.adapters_gptq")


def machine() -> str:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.machine()}, {os.cpu_count()} cores, {gpu}, torch {torch.__version__}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench")
    p.add_argument("--only", nargs="+", help="row names (or prefixes) to run")
    p.add_argument("--quick", action="store_true", help="fewer repetitions and tokens")
    p.add_argument("--models-dir", default="models")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import importlib

    rows = []
    for name in MODULES:
        module = importlib.import_module(name)
        wanted = None
        if args.only:
            wanted = {r for r in module.ROWS if any(r.startswith(o) for o in args.only)}
            if not wanted:
                continue
        rows += module.run(Path(args.models_dir), quick=args.quick, only=wanted)

    print(f"{'name':42} {'ours':>12} {'reference':>12} {'ratio':>8}  unit")
    for r in rows:
        print(f"{r.name:42} {r.ours:12.4g} {r.reference:12.4g} {r.ratio:8.3g}  {r.unit}"
              f"{'' if r.higher_is_better else ' (lower is better)'}  {r.note}")
    result = {"machine": machine(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "results": [r.to_dict() for r in rows]}
    (HERE / "results.json").write_text(json.dumps(result, indent=2))
    if not args.only and not args.quick:
        lines = [f"# Last full benchmark run\n\n{result['date']} on {result['machine']}\n",
                 "| name | ours | reference | ratio | unit | note |", "|---|---|---|---|---|---|"]
        lines += [f"| {r.name} | {r.ours:.4g} | {r.reference:.4g} | {r.ratio:.3g} | {r.unit} | {r.note} |" for r in rows]
        (HERE / "RESULTS.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
