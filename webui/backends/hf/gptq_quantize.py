"""The GPTQ quantizer, with GPTQModel: a float transformers folder → a GPTQ folder that the gptq loader (or plain
transformers with GPTQModel installed) loads. A leaf module: the GPTQ export (merge, then quantize), the
embedded model's GPTQ copy and the gptq loader all use it, and it imports none of them.

GPTQ picks each layer's rounding to keep that layer's outputs on real text close to the float ones, so
it needs calibration text: webui/data/calibration.txt (plain English prose, dialogue, instructions,
lists and a little code, written for this project) unless `--calibration FILE` names the user's own
(plain text; paragraphs separated by blank lines are the samples).

Group size: 128 unless the model's layer sizes are not multiples of it, then the largest of 64/32/16 that
fits (SmolLM2's hidden size is 576: 64).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from webui.backends import machine
from webui.errors import BadInput, Unsupported
from webui.progress import Progress, no_progress

CALIBRATION = Path(__file__).resolve().parents[2] / "data" / "calibration.txt"  # webui/data/
BITS = (2, 3, 4, 8)        # what GPTQModel's GPTQ kernels pack
MAX_SAMPLES = 128          # GPTQ papers use 128 samples; more adds time, not accuracy
SAMPLE_CHARS = 1000        # ~250 tokens of English per sample: enough context, and more samples
GROUP_SIZES = (128, 64, 32, 16)  # in order of preference: smaller groups fit closer but store more scales


def gptqmodel_env() -> None:
    """GPTQModel sizes its CPU thread pool from GPTQMODEL_CPU_WORKERS when it is imported; its default is
    too small on few-core machines (measured: it crashes on 2 cores), so use the core count unless the
    user chose. Call before the first import of gptqmodel."""
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(os.cpu_count() or 1))


def quantization_config(path: Path) -> dict:
    """The GPTQ `quantization_config` of a model folder ({} when there is none): how a GPTQ folder is told apart."""
    try:
        qc = json.loads((Path(path) / "config.json").read_text()).get("quantization_config") or {}
    except (OSError, ValueError):
        return {}
    return qc if str(qc.get("quant_method", "")).lower() == "gptq" else {}


def calibration_samples(path: Path | None = None) -> list[str]:
    """Samples from a text file: its blank-line-separated paragraphs, joined up to SAMPLE_CHARS each."""
    path = Path(path) if path else CALIBRATION
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise BadInput(f"--calibration {path}: cannot read it as UTF-8 text ({e})") from None
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
        raise BadInput(f"--calibration {path}: too little text (give a few paragraphs at least)")
    return samples[:MAX_SAMPLES]


def quantize_folder(src: Path, dst: Path, bits: int = 4, group_size: int | None = None,
                    calibration: Path | None = None, progress: Progress = no_progress) -> None:
    """GPTQModel: quantize the float transformers folder `src` into `dst` (which must not exist); group_size
    None picks one (see pick_group_size)."""
    if bits not in BITS:
        raise BadInput(f"--bits {bits}: GPTQ packs {', '.join(map(str, BITS))} bits")
    if quantization_config(src):
        raise Unsupported(f"{src.name} is already GPTQ-quantized; export from its float model")
    group_size = pick_group_size(src, group_size)
    samples = calibration_samples(calibration)
    gptqmodel_env()
    import torch  # heavy: only a quantization needs it
    from transformers import AutoTokenizer
    try:
        from gptqmodel import GPTQModel, QuantizeConfig  # optional dependency, and reads the env set above
    except ImportError as e:
        raise Unsupported(f"GPTQ quantization needs GPTQModel, which cannot be imported: {e}") from None

    tok = AutoTokenizer.from_pretrained(str(src), local_files_only=True)
    progress(None, f"quantizing {src.name} to {bits}-bit GPTQ, group size {group_size}, "
                   f"{len(samples)} calibration samples (GPTQModel)")
    # GPTQModel holds the whole float32 model on CPU unless it parks layers in a temp folder (offload_to_disk),
    # which is slower: parked only when that copy would not fit in free memory (not run at such a size here)
    offload = not torch.cuda.is_available() and machine.load_need(src, 4) > machine.available()
    if offload:
        progress(None, f"a float32 copy of {src.name} does not fit in free memory: GPTQModel parks layers on disk")
    config = QuantizeConfig(bits=bits, group_size=group_size, offload_to_disk=offload)
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
        raise BadInput(f"--group-size {requested}: use a power of two (32, 64, 128) or -1")
    if not fits(requested):
        raise BadInput(f"--group-size {requested} does not divide the layer sizes {sorted(sizes)} of "
                                   f"{src.name}; pick one that does (e.g. {pick_group_size(src)})")
    return requested
