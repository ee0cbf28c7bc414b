"""Export: merge adapters into a base and write a model that loads on its loader with no adapter.

`safetensors`: a transformers folder (config, tokenizer with chat template, generation config,
safetensors weights) that plain `AutoModelForCausalLM.from_pretrained` loads. The merge runs on a fresh
float copy of the base (never on the model the app is serving) through the same Engine operations as
the chat, and the result is saved in the base's own dtype. `gguf`: see webui/export_gguf.py (`--quant`
picks the type). `gptq`: merge, then quantize with GPTQModel (see webui/export_gptq.py; `--bits`,
`--group-size`, `--calibration`).

    python -m webui export --model M --lora A --lora B --weights 1 0.5 --format safetensors --out DIR
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from webui.adapters.files import resolve_adapter
from webui.backends.base import Progress, UnsupportedOperation, no_progress
from webui.config import ModelSpec
from webui.engine import Engine

FORMATS = ("safetensors", "gguf", "gptq")


def export_model(model: str, loras: list[str], weights: list[float] | None, fmt: str, out: Path,
                 models_dir: Path = Path("models"), loras_dir: Path = Path("loras"),
                 progress: Progress = no_progress, quant: str | None = None, bits: int = 4,
                 group_size: int | None = None, calibration: Path | None = None) -> Path:
    if fmt not in FORMATS:
        raise UnsupportedOperation(f"--format {fmt!r} is not one of: {', '.join(FORMATS)}")
    if fmt == "gguf":  # merge (PEFT, or into the GGUF's own weights), write GGUF, quantize: webui/export_gguf.py
        from webui.export_gguf import export_gguf

        weights = list(weights or [1.0] * len(loras))
        if len(weights) != len(loras):
            raise UnsupportedOperation(f"{len(weights)} weight(s) given for {len(loras)} adapter(s)")
        return export_gguf(model, loras, weights, Path(out), Path(models_dir), Path(loras_dir), quant, progress)
    weights = list(weights or [1.0] * len(loras))
    if len(weights) != len(loras):
        raise UnsupportedOperation(f"{len(weights)} weight(s) given for {len(loras)} adapter(s)")
    if fmt == "gptq":  # merge on a float copy (the safetensors path below), then quantize: webui/export_gptq.py
        from webui.export_gptq import export_gptq

        return export_gptq(model, loras, weights, Path(out), Path(models_dir), Path(loras_dir), bits, group_size,
                           calibration, progress)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} already exists and is not empty; choose another --out")

    engine = Engine(models_dir, loras_dir)
    progress(0.05, "loading the base")
    engine.load(ModelSpec(model=model, loader="transformers"), progress)
    paths = {Path(n).name: resolve_adapter(n, loras_dir, allow_paths=True) for n in loras}
    if loras:
        progress(0.5, f"applying {', '.join(paths)}")
        engine.set_adapters(dict(zip(paths, weights)), paths)
    progress(0.7, "merging and saving")
    backend = engine._backend  # a private Engine of this export: nobody else uses it
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        backend.save_merged(tmp)
        (tmp / "lora-deck-export.json").write_text(json.dumps(
            {"base": engine.loaded.path, "adapters": dict(zip(paths, weights)), "format": fmt}, indent=2))
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    progress(1.0, f"wrote {out}")
    return out
