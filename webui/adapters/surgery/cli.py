"""`python -m webui extract | resize | convert`: adapter surgery from the command line (ops.py does the work; the
flags are webui/options/commands.py's ExtractOptions, ResizeOptions and ConvertOptions). Each prints one line per
layer (rank, energy kept, relative error) and the totals on stdout, then the new adapter's folder; progress goes
to stderr. A failure is one `error:` line from webui/cli.py's wrapper (exit status 1).

    python -m webui resize my-lora --rank 8 --out my-lora-r8
    python -m webui convert my-dora --to lora --out my-dora-as-lora
    python -m webui extract --base Llama-3.2-1B --tuned my-finetune --rank 16 --out my-finetune-lora
"""
from __future__ import annotations

import sys
from pathlib import Path


def run(command: str, o) -> int:
    """Run `command` with its options dataclass `o`; raises LoraDeckError for what a user can fix."""
    from webui.adapters.surgery import ops  # torch: webui/cli.py's subcommands import their modules when they run

    def progress(fraction, message):
        print(f"[{command}] {message}", file=sys.stderr, flush=True)

    loras = Path(o.loras_dir)
    if command == "resize":
        result = ops.resize(o.adapter, loras, o.out, o.rank, o.energy, o.force, progress)
    elif command == "convert":
        result = ops.convert(o.adapter, loras, o.out, Path(o.models_dir), o.model or None, o.rank, o.energy,
                             o.force, progress)
    else:
        result = ops.extract(o.base, o.tuned, Path(o.models_dir), loras, o.out, o.rank, o.energy, o.force, progress)
    for f in result.fits:
        print(f"{f.module}  rank {f.source_rank} → {f.rank}  energy {f.energy:.6f}  error {f.rel_error:.6e}")
    t = result.total
    print(f"total: {t['layers']} layers, energy kept {t['energy']:.6f}, relative error {t['rel_error']:.6e} "
          f"(largest layer {t['max_layer_error']:.6e})")
    for note in result.notes:
        print(f"note: {note}")
    print(result.path)
    return 0
