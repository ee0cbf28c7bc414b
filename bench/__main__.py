"""Run the benchmarks and print ratios measured side by side in one run:

    .venv/bin/python -m bench [--only NAME...] [--quick] [--big]

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
MODULES = ("bench.adapters_transformers", "bench.api_transformers", "bench.training", "bench.adapters_llamacpp", "bench.serving_llamacpp",
           "bench.download",
           "bench.adapters_gptq", "bench.serving", "bench.lora_panel", "bench.remote", "bench.vllm", "bench.soak")
# at a real size (a synthetic 1.1B model built once under ~/.cache): only with --big, or a row named with --only
BIG_MODULES = ("bench.big", "bench.big_export")


def machine() -> str:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.machine()}, {os.cpu_count()} cores, {gpu}, torch {torch.__version__}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench")
    p.add_argument("--only", nargs="+", help="row names (or prefixes) to run")
    p.add_argument("--quick", action="store_true", help="fewer repetitions and tokens")
    p.add_argument("--big", action="store_true", help="the rows at the synthetic 1.1B size too (builds the model "
                   "once under ~/.cache/loradeck/bench-big: ~5 GB of disk, minutes)")
    p.add_argument("--models-dir", default="models")
    p.add_argument("--results", default=str(HERE / "results.json"), help="where to write the results JSON")
    p.add_argument("--module", help=argparse.SUPPRESS)    # internal: run one module in this process
    p.add_argument("--rows-out", help=argparse.SUPPRESS)  # internal: where that module's rows go
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import importlib
    import subprocess
    import tempfile

    from bench.common import Row

    if args.module:
        module = importlib.import_module(args.module)
        wanted = {r for r in module.ROWS if any(r.startswith(o) for o in args.only)} if args.only else None
        rows = module.run(Path(args.models_dir), quick=args.quick, only=wanted)
        Path(args.rows_out).write_text(json.dumps([r.to_dict() for r in rows]))
        return 0

    rows, failed = [], []
    for name in MODULES + BIG_MODULES:
        if name in BIG_MODULES and not (args.big or args.only):
            continue
        module = importlib.import_module(name)
        if args.only and not any(r.startswith(o) for r in module.ROWS for o in args.only):
            continue
        # Each module runs in a process of its own: library state (models, hub settings read at import)
        # and memory from one benchmark never leak into the next, and one failure does not stop the rest.
        with tempfile.NamedTemporaryFile(suffix=".json") as out:
            cmd = [sys.executable, "-m", "bench", "--module", name, "--rows-out", out.name,
                   "--models-dir", args.models_dir, *(["--quick"] if args.quick else []),
                   *(["--only", *args.only] if args.only else [])]
            if subprocess.run(cmd, cwd=HERE.parent).returncode != 0:
                failed.append(name)
                continue
            fields = {"name", "ours", "reference", "unit", "higher_is_better", "note"}
            rows += [Row(**{k: v for k, v in r.items() if k in fields}) for r in json.loads(Path(out.name).read_text())]

    print(f"{'name':42} {'ours':>12} {'reference':>12} {'ratio':>8}  unit")
    for r in rows:
        print(f"{r.name:42} {r.ours:12.4g} {r.reference:12.4g} {r.ratio:8.3g}  {r.unit}"
              f"{'' if r.higher_is_better else ' (lower is better)'}  {r.note}")
    result = {"machine": machine(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "results": [r.to_dict() for r in rows]}
    Path(args.results).write_text(json.dumps(result, indent=2))
    if not args.only and not args.quick:
        lines = [f"# Last full benchmark run\n\n{result['date']} on {result['machine']}\n",
                 "| name | ours | reference | ratio | unit | note |", "|---|---|---|---|---|---|"]
        lines += [f"| {r.name} | {r.ours:.4g} | {r.reference:.4g} | {r.ratio:.3g} | {r.unit} | {r.note} |" for r in rows]
        (HERE / "RESULTS.md").write_text("\n".join(lines) + "\n")
    if failed:
        print(f"failed: {', '.join(failed)} (see above)", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
