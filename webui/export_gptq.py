"""Export to GPTQ: merge, then quantize. PEFT cannot merge a LoRA into 4-bit weights, so the adapters are
merged into a float copy of the base by the safetensors export (PEFT's merge on a private Engine), and
the merged folder is quantized with GPTQModel (CPU or CUDA) into a folder that the gptq loader, or plain
transformers with GPTQModel installed, loads with no adapter.

GPTQ picks each layer's rounding to keep that layer's outputs on real text close to the float ones, so
it needs calibration text: webui/data/calibration.txt (plain English prose, dialogue, instructions,
lists and a little code, written for this project) unless `--calibration FILE` names the user's own
(plain text; paragraphs separated by blank lines are the samples).

Also the GPTQ copy of the embedded SmolLM2 (`ensure_embedded`): quantized once into
models/SmolLM2-135M-Instruct-GPTQ/ and reused after.

    python -m webui export --model M --lora A --format gptq --out DIR [--bits 4 --group-size 128]
                           [--calibration FILE]

Group size: 128 unless the model's layer sizes are not multiples of it, then the largest of 64/32/16 that
fits (SmolLM2's hidden size is 576: 64).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from webui.backends.base import ModelLoadError, Progress, UnsupportedOperation, no_progress

CALIBRATION = Path(__file__).resolve().parent / "data" / "calibration.txt"
BITS = (2, 3, 4, 8)        # what GPTQModel's GPTQ kernels pack
MAX_SAMPLES = 128          # GPTQ papers use 128 samples; more adds time, not accuracy
SAMPLE_CHARS = 1000        # ~250 tokens of English per sample: enough context, and more samples
GROUP_SIZES = (128, 64, 32, 16)  # in order of preference: smaller groups fit closer but store more scales
_DONE = ".lora-deck-converted"


def calibration_samples(path: Path | None = None) -> list[str]:
    """Samples from a text file: its blank-line-separated paragraphs, joined up to SAMPLE_CHARS each."""
    path = Path(path) if path else CALIBRATION
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UnsupportedOperation(f"--calibration {path}: cannot read it as UTF-8 text ({e})") from None
    paragraphs = [p.strip() for p in text.replace("\r\n", "\n").split("\n\n") if p.strip()]
    samples, current = [], ""
    for p in paragraphs:
        if current and len(current) + len(p) > SAMPLE_CHARS:
            samples.append(current)
            current = ""
        current = f"{current}\n\n{p}" if current else p
    if current:
        samples.append(current)
    if sum(len(s) for s in samples) < 200:
        raise UnsupportedOperation(f"--calibration {path}: too little text (give a few paragraphs at least)")
    return samples[:MAX_SAMPLES]


def quantize_folder(src: Path, dst: Path, bits: int = 4, group_size: int | None = None,
                    calibration: Path | None = None, progress: Progress = no_progress) -> None:
    """GPTQModel: quantize the float transformers folder `src` into `dst` (which must not exist); group_size
    None picks one (see pick_group_size)."""
    from webui.backends.gptq import gptqmodel_env, quantization_config

    if bits not in BITS:
        raise UnsupportedOperation(f"--bits {bits}: GPTQ packs {', '.join(map(str, BITS))} bits")
    if quantization_config(src):
        raise UnsupportedOperation(f"{src.name} is already GPTQ-quantized; export from its float model")
    group_size = pick_group_size(src, group_size)
    samples = calibration_samples(calibration)
    gptqmodel_env()
    import torch
    from transformers import AutoTokenizer
    try:
        from gptqmodel import GPTQModel, QuantizeConfig
    except ImportError as e:
        raise UnsupportedOperation(f"GPTQ quantization needs GPTQModel, which cannot be imported: {e}") from None

    tok = AutoTokenizer.from_pretrained(str(src), local_files_only=True)
    progress(None, f"quantizing {src.name} to {bits}-bit GPTQ, group size {group_size}, "
                   f"{len(samples)} calibration samples (GPTQModel)")
    # offload_to_disk would park layers in a temp folder: not worth it for the models one quantizes on CPU
    config = QuantizeConfig(bits=bits, group_size=group_size, offload_to_disk=False)
    model = GPTQModel.load(str(src), config, dtype=torch.float16 if torch.cuda.is_available() else torch.float32)
    model.quantize(samples, tokenizer=tok, batch_size=1)
    model.save(str(dst))
    tok.save_pretrained(str(dst))


def pick_group_size(src: Path, requested: int | None = None) -> int:
    """The group size to quantize `src` with. Every quantized layer's input size must be a multiple of it
    (GPTQModel's CPU int4 kernel refuses other sizes at the first forward pass, measured: SmolLM2's 576 with
    128). None: 128, or the largest of 64/32/16 that fits. A requested size that does not fit is refused."""
    cfg = json.loads((src / "config.json").read_text())
    sizes = {cfg.get(k) for k in ("hidden_size", "intermediate_size", "d_model", "n_embd")} - {None}
    fits = lambda g: all(s % g == 0 for s in sizes if isinstance(s, int))  # noqa: E731
    if requested is None:
        return next((g for g in GROUP_SIZES if fits(g)), -1)
    if requested == -1:
        return requested
    if requested <= 0 or requested & (requested - 1):
        raise UnsupportedOperation(f"--group-size {requested}: use a power of two (32, 64, 128) or -1")
    if not fits(requested):
        raise UnsupportedOperation(f"--group-size {requested} does not divide the layer sizes {sorted(sizes)} of "
                                   f"{src.name}; pick one that does (e.g. {pick_group_size(src)})")
    return requested


def export_gptq(model: str, loras: list[str], weights: list[float], out: Path, models_dir: Path, loras_dir: Path,
                bits: int = 4, group_size: int | None = None, calibration: Path | None = None,
                progress: Progress = no_progress) -> Path:
    from webui import embedded
    from webui.backends.gptq import quantization_config
    from webui.export import export_model
    from webui.models import resolve_model_path

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} already exists and is not empty; choose another --out")
    src = resolve_model_path(model, models_dir) if model else embedded.ensure_transformers_folder(models_dir, progress)
    if src.is_dir() and quantization_config(src):
        raise UnsupportedOperation(f"{src.name} is already GPTQ-quantized: merge and quantize from its float "
                                   "model (PEFT cannot merge into GPTQ weights)")
    calibration_samples(calibration)  # a bad --calibration file or --group-size fails before the merge
    if src.is_dir() and (src / "config.json").is_file():
        group_size = pick_group_size(src, group_size)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        if loras or not (src.is_dir() and (src / "config.json").is_file()):
            progress(0.05, "merging on a float copy of the base (safetensors export)")
            src = export_model(model, loras, weights, "safetensors", work / "merged", models_dir, loras_dir, progress)
        group_size = pick_group_size(src, group_size)
        quantize_folder(src, work / "gptq", bits, group_size, calibration, progress)
        (work / "gptq" / "lora-deck-export.json").write_text(json.dumps(
            {"base": model or embedded.NAME, "adapters": dict(zip([Path(n).name for n in loras], weights)),
             "format": "gptq", "bits": bits, "group_size": group_size,
             "calibration": str(calibration) if calibration else "webui/data/calibration.txt"}, indent=2))
        if out.exists():
            out.rmdir()
        os.replace(work / "gptq", out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    progress(1.0, f"wrote {out} (load it with --loader gptq, no adapter needed)")
    return out


def embedded_folder(models_dir: Path) -> Path:
    from webui import embedded
    return Path(models_dir) / f"{embedded.NAME}-GPTQ"


def ensure_embedded(models_dir: Path, progress: Progress | None = None) -> Path:
    """models_dir/SmolLM2-135M-Instruct-GPTQ: the embedded model quantized to 4 bits once (~3 min on 2 CPU
    cores, from its safetensors conversion), reused after."""
    from webui import embedded

    target = embedded_folder(models_dir)
    if (target / _DONE).is_file():
        return target
    progress = progress or no_progress
    src = embedded.ensure_transformers_folder(Path(models_dir), progress)
    progress(None, f"quantizing the embedded {embedded.NAME} to 4-bit GPTQ (once, a few minutes on CPU)")
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=models_dir))
    try:
        try:
            quantize_folder(src, tmp / "q", 4, None, None, progress)  # group 64: 576 is not a multiple of 128
        except Exception as e:  # reported like any model that cannot load (the Engine keeps the previous one)
            raise ModelLoadError(f"could not quantize {embedded.NAME} for the gptq loader: "
                                 f"{str(e).strip().splitlines()[0] if str(e).strip() else repr(e)}") from e
        (tmp / "q" / _DONE).write_text(f"quantized from {src.name}\n")
        if (target / _DONE).is_file():
            return target  # another process finished the same quantization meanwhile
        if target.exists():
            shutil.rmtree(target)  # an earlier, unfinished attempt (no marker)
        os.replace(tmp / "q", target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
