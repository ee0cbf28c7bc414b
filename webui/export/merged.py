"""Export to safetensors: merge adapters into a base and write a transformers folder (config, tokenizer with
chat template, generation config, safetensors weights) that plain `AutoModelForCausalLM.from_pretrained`
loads with no adapter. The merge runs on a private Engine holding a fresh float copy of the base (never
the model the app is serving), through the same Engine operations as the chat; the result is saved in the
base's own dtype. The GGUF and GPTQ writers start from this folder when the base is a transformers model.

    python -m webui export --model M --lora A --lora B --weights 1 0.5 --format safetensors --out DIR
"""
from __future__ import annotations

import json
from pathlib import Path

from webui.adapters.files import locate_adapter
from webui.atomic import write_into_place
from webui.engine import Engine
from webui.errors import BadInput
from webui.options.config import ModelSpec
from webui.progress import Progress, no_progress


def export_safetensors(model: str, loras: list[str], weights: list[float], out: Path, models_dir: Path,
                       loras_dir: Path, progress: Progress = no_progress) -> Path:
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise BadInput(f"{out} already exists and is not empty; choose another --out")
    engine = Engine(models_dir, loras_dir)
    progress(0.05, "loading the base")
    engine.load(ModelSpec(model=model, loader="transformers"), progress)
    paths = {Path(n).name: locate_adapter(n, loras_dir, anywhere=True) for n in loras}
    if loras:
        progress(0.5, f"applying {', '.join(paths)}")
        engine.set_adapters(dict(zip(paths, weights)), paths)
    progress(0.7, "merging and saving")
    base_path = engine.loaded.path
    with write_into_place(out) as tmp:  # an empty folder may stand at `out`; a non-empty one is refused above
        engine.save_merged(tmp)
        (tmp / "lora-deck-export.json").write_text(json.dumps(
            {"base": base_path, "adapters": dict(zip(paths, weights)), "format": "safetensors"}, indent=2))
    progress(1.0, f"wrote {out}")
    return out
