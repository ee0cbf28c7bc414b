"""Export to GPTQ: merge, then quantize. PEFT cannot merge a LoRA into 4-bit weights, so the adapters are
merged into a float copy of the base by the safetensors export (PEFT's merge on a private Engine), and
the merged folder is quantized with GPTQModel (webui/backends/hf/gptq_quantize.py; CPU or CUDA) into a folder
that the gptq loader, or plain transformers with GPTQModel installed, loads with no adapter.

    python -m webui export --model M --lora A --format gptq --out DIR [--bits 4 --group-size 128]
                           [--calibration FILE]
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

from webui.atomic import write_into_place
from webui.backends import embedded
from webui.backends.hf.gptq_quantize import calibration_samples, pick_group_size, quantization_config, quantize_folder
from webui.backends.models import resolve_model_path
from webui.errors import BadInput, Unsupported
from webui.export.merged import export_safetensors
from webui.progress import Progress, no_progress


def export_gptq(model: str, loras: list[str], weights: list[float], out: Path, models_dir: Path, loras_dir: Path,
                bits: int = 4, group_size: int | None = None, calibration: Path | None = None,
                progress: Progress = no_progress) -> Path:
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BadInput(f"{out} already exists and is not empty; choose another --out")
    src = resolve_model_path(model, models_dir) if model else embedded.ensure_transformers_folder(models_dir, progress)
    if src.is_dir() and quantization_config(src):
        raise Unsupported(f"{src.name} is already GPTQ-quantized: merge and quantize from its float "
                                   "model (PEFT cannot merge into GPTQ weights)")
    calibration_samples(calibration)  # a bad --calibration file or --group-size fails before the merge
    if src.is_dir() and (src / "config.json").is_file():
        group_size = pick_group_size(src, group_size)
    # staging becomes `out`; the merged float copy is scratch beside it, gone either way
    with write_into_place(out, folder=False) as staging, \
            tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as scratch:
        work = Path(scratch)
        if loras or not (src.is_dir() and (src / "config.json").is_file()):
            progress(0.05, "merging on a float copy of the base (safetensors export)")
            src = export_safetensors(model, loras, weights, work / "merged", models_dir, loras_dir, progress)
        group_size = pick_group_size(src, group_size)
        quantize_folder(src, staging, bits, group_size, calibration, progress)
        (staging / "lora-deck-export.json").write_text(json.dumps(
            {"base": model or embedded.NAME, "adapters": dict(zip([Path(n).name for n in loras], weights)),
             "format": "gptq", "bits": bits, "group_size": group_size,
             "calibration": str(calibration) if calibration else "webui/data/calibration.txt"}, indent=2))
    progress(1.0, f"wrote {out} (load it with --loader gptq, no adapter needed)")
    return out
