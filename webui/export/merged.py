"""Export to safetensors: merge adapters into a base and write a transformers folder (config, tokenizer with
chat template, generation config, safetensors weights) that plain `AutoModelForCausalLM.from_pretrained`
loads with no adapter, in the base's own dtype. The GGUF and GPTQ writers start from the same merge.

A safetensors base is merged one tensor at a time (webui/export/stream_merge.py): the export holds about one
shard of the output, whatever the model's size. What that cannot reproduce (DoRA, LoRA biases, saved modules,
tied embeddings, a .bin or GGUF base) is merged on a private Engine holding a fresh float copy of the base
(never the model the app is serving), through the same Engine operations as the chat, which needs room for
that copy: webui/backends/machine.py refuses it up front when it cannot fit.

    python -m webui export --model M --lora A --lora B --weights 1 0.5 --format safetensors --out DIR
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from webui.adapters.files import load_weights, locate_adapter, read_adapter
from webui.adapters.surgery.folders import ModelTensors
from webui.atomic import write_into_place
from webui.backends import machine, models
from webui.engine import Engine
from webui.errors import BadInput
from webui.export.stream_merge import MergePlan, NotStreamable, memory_need, plan_merge, write_merged
from webui.options.config import ModelSpec
from webui.progress import Progress, no_progress

log = logging.getLogger(__name__)


def streaming_plan(src: Path, loras: list[str], weights: list[float], loras_dir: Path) -> MergePlan:
    """The tensor-by-tensor merge of `loras` into the folder `src`; NotStreamable when only the loaded-model merge
    can do it (the reason says why)."""
    if not (src.is_dir() and (src / "config.json").is_file()):
        raise NotStreamable(f"{src.name} is not a transformers folder")
    try:
        base = ModelTensors(src)
    except BadInput as e:
        raise NotStreamable(str(e)) from None
    adapters = []
    for name, weight in zip(loras, weights):
        files = read_adapter(locate_adapter(name, loras_dir, anywhere=True))
        adapters.append((files, load_weights(files), float(weight)))
    return plan_merge(adapters, base)


def export_safetensors(model: str, loras: list[str], weights: list[float], out: Path, models_dir: Path,
                       loras_dir: Path, progress: Progress = no_progress) -> Path:
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise BadInput(f"{out} already exists and is not empty; choose another --out")
    src, _ = models.resolve(model, "transformers", Path(models_dir), progress)
    names = [Path(n).name for n in loras]
    try:
        plan = streaming_plan(src, loras, weights, Path(loras_dir))
    except NotStreamable as why:
        plan = None
        machine.check_fits("merging on a loaded copy of the base", machine.loaded_merge_need(src), out.parent,
                           machine.weights_size(src), note=f"({why}, so the merge needs the loaded model)")
        progress(0.05, f"{why}: merging on a loaded copy of the base")
    else:
        machine.check_fits("the merge", memory_need(src), out.parent, machine.weights_size(src))
    with write_into_place(out) as tmp:  # an empty folder may stand at `out`; a non-empty one is refused above
        if plan is not None:
            progress(0.1, f"merging {', '.join(names) or 'nothing'} into {src.name}, one tensor at a time")
            write_merged(src, plan, tmp, progress)
        else:
            _merge_loaded(model, loras, weights, tmp, Path(models_dir), Path(loras_dir), progress)
        (tmp / "lora-deck-export.json").write_text(json.dumps(
            {"base": str(src), "adapters": dict(zip(names, weights)), "format": "safetensors"}, indent=2))
    progress(1.0, f"wrote {out}")
    return out


def _merge_loaded(model, loras, weights, tmp: Path, models_dir: Path, loras_dir: Path, progress: Progress) -> None:
    engine = Engine(models_dir, loras_dir)
    progress(0.1, "loading the base")
    engine.load(ModelSpec(model=model, loader="transformers", dtype="float32", device="cpu"), progress)
    paths = {Path(n).name: locate_adapter(n, loras_dir, anywhere=True) for n in loras}
    if loras:
        progress(0.5, f"applying {', '.join(paths)}")
        engine.set_adapters(dict(zip(paths, weights)), paths)
    progress(0.7, "merging and saving")
    engine.save_merged(tmp)
