"""Export an adapter unmerged, as a GGUF LoRA file that llama.cpp, llama-server, LM Studio and Ollama load next
to the original GGUF base (`--lora FILE` / `ADAPTER FILE`). The conversion is the llama.cpp loader's own
(webui/adapters/gguf_lora.py): one adapter at weight 1 gives the very file the loader converts at run time; a
weight, or a weighted stack of several, becomes one adapter whose A/B factors are concatenated along the
rank with each weight and PEFT scale (rsLoRA, alpha_pattern, rank_pattern) folded into B — its delta is the
stack's exactly (PEFT's `cat`), whatever the ranks.

    python -m webui export --format gguf-lora --model BASE.gguf --lora A [--lora B --weights 1 0.5]
        [--outtype f32|f16|q8_0] --out PATH(.gguf | folder)
"""
from __future__ import annotations

from pathlib import Path

from webui.adapters.gguf_lora import OUTTYPES, display_name, lora_pairs, read_base, stack_pairs, write_gguf_lora
from webui.atomic import write_into_place
from webui.backends import embedded
from webui.backends.models import resolve_model_path
from webui.errors import BadInput, Unsupported
from webui.export.gguf_writer import read_adapters
from webui.progress import Progress, no_progress


def gguf_base_path(model: str, models_dir: Path) -> Path:
    """The GGUF file a LoRA is written for: `model` (a models-dir name or a path), or the embedded GGUF."""
    path = embedded.gguf_path() if not model else resolve_model_path(model, Path(models_dir))
    if not (path.is_file() and path.suffix == ".gguf"):
        raise BadInput(f"{path.name}: a GGUF LoRA is written for the GGUF base it will run next to; give that file "
                       "(--model NAME.gguf). A transformers base can be written as GGUF first (--format gguf)")
    return path


def out_file(out: Path, tag: str, outtype: str) -> Path:
    """`out` itself when it names a .gguf file, else `<tag>.<outtype>.gguf` inside the folder `out`."""
    target = out if out.suffix == ".gguf" else out / f"{tag}.{outtype.upper()}.gguf"
    if target.exists():
        raise BadInput(f"{target} already exists; choose another --out")
    return target


def export_gguf_lora(model: str, loras: list[str], weights: list[float], out: Path, models_dir: Path,
                     loras_dir: Path, outtype: str | None = None, progress: Progress = no_progress) -> Path:
    outtype = (outtype or "f32").lower()
    if outtype not in OUTTYPES:
        raise BadInput(f"--outtype {outtype!r} is not one of: {', '.join(OUTTYPES)}")
    if not loras:
        raise BadInput("--format gguf-lora writes an adapter: name one with --lora (or several, with --weights)")
    path = gguf_base_path(model, models_dir)
    progress(0.1, f"reading {path.name}")
    base = read_base(path)
    adapters = read_adapters(loras, weights, Path(loras_dir), base)
    for files, *_ in adapters:
        if files.format == "gguf":
            raise Unsupported(f"{files.name} is a GGUF LoRA already; export from its PEFT folder to re-weight or "
                              "stack it")
    progress(0.4, f"converting {', '.join(a[0].name for a in adapters)}")
    stack = [(lora_pairs(files, state, base, ignored), weight) for files, state, weight, ignored in adapters]
    files = adapters[0][0]
    if len(adapters) == 1 and adapters[0][2] == 1.0:
        # One adapter as it is: its own alpha and name, exactly what the llama.cpp loader converts at run time.
        pairs, alpha, name = stack[0][0], float(files.config.get("lora_alpha", files.config["r"])), files.name
        base_model = files.config.get("base_model_name_or_path") or display_name(path.name)
    else:
        pairs = stack_pairs(stack)
        alpha = float(max(a.shape[0] for _, a, _, _ in pairs))  # any alpha works: each pair's scale is folded
        name = "+".join(f"{a[0].name}*{a[2]:g}" for a in adapters)
        base_model = display_name(path.name)
    tag = "+".join(a[0].name for a in adapters)
    target = out_file(Path(out), tag, outtype)
    with write_into_place(target, folder=False) as part:
        write_gguf_lora(pairs, base, part, name, alpha, base_model, outtype)
    progress(1.0, f"wrote {target} ({outtype}; load it next to {path.name})")
    return target
