"""Export to GGUF: merge adapters into a base and write a GGUF that llama.cpp loads with no adapter.

- A transformers base: each tensor is read, merged (webui/export/stream_merge.py: PEFT's merge, tensor by
  tensor), converted and written in turn (webui/export/hf_to_gguf.py), so the export holds about one tensor:
  F32, F16, BF16 and Q8_0 are written directly (gguf's quantizers, bit for bit llama.cpp's); other types are
  quantized by llama.cpp from a lossless file in the base's own type. What the streaming merge cannot do (DoRA,
  saved modules, a .bin base) is merged on a loaded copy first (webui/export/merged.py).
- A GGUF base (the embedded SmolLM2, any .gguf): each weight is dequantized with `gguf.quants`, the LoRA
  delta sum_i w_i * scale_i * B_i A_i is added (q/k rows permuted as the base's), and a new F32 GGUF is
  written with every metadata key of the base (tokenizer, chat template, hyper-parameters), then quantized.

Quantization to k-quants is llama.cpp's own `llama_model_quantize`. Default type: Q8_0 for models under 3B parameters,
Q4_K_M above. Re-quantizing can erase a small change — a base already on the Q4_1 grid plus a small
delta rounds back to the same Q4_1 values — so after writing, the exported tensors are compared with the
base quantized alike, and a warning says how much of the adapter's change survived; re-quantizing a
quantized base to another type is noted too (it adds rounding error of its own).

    python -m webui export --lora NAME --format gguf [--quant Q4_K_M|Q8_0|F16|F32...] --out PATH
"""
from __future__ import annotations

import ctypes
import logging
import math
import mmap
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from webui.adapters.files import load_weights, locate_adapter, read_adapter
from webui.adapters.gguf_lora import lora_pairs, read_base
from webui.adapters.inspect import inspect_adapter
from webui.atomic import write_into_place
from webui.backends import machine, models
from webui.errors import BadInput, Incompatible, Unsupported
from webui.export import stream_merge
from webui.export.hf_to_gguf import FTYPES, HfToGguf
from webui.export.merged import export_safetensors, streaming_plan
from webui.export.stream_merge import NotStreamable
from webui.progress import Progress, no_progress

log = logging.getLogger(__name__)

QUANTS = ("F32", "F16", "BF16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_1", "Q5_0", "Q4_K_M", "Q4_K_S",
          "Q4_1", "Q4_0", "Q3_K_L", "Q3_K_M", "Q3_K_S", "Q2_K")
SMALL_MODEL = 3_000_000_000  # below this, Q8_0 by default: small models lose the most to 4-bit grids
KEEP_AT_LEAST = 0.5           # warn when less than half of the adapter's change survives quantization
# changed tensors the kept-change check reads, spread over the model: checking all of them quantized each one a
# second time in numpy, which doubled the time of a Q8_0 export at 1.1B (74 s against llama.cpp's 24 s)
KEPT_SAMPLE = 16


def default_quant(parameters: int) -> str:
    return "Q8_0" if parameters < SMALL_MODEL else "Q4_K_M"


def quantize(src: Path, dst: Path, quant: str) -> None:
    """llama.cpp's quantizer, from an F32/F16 GGUF to `quant`."""
    import llama_cpp  # optional, compiled: only quantizing needs it

    if quant not in QUANTS:
        raise Unsupported(f"--quant {quant!r} is not one of: {', '.join(QUANTS)}")
    if quant == "F32":
        shutil.copyfile(src, dst)
        return
    if logging.getLogger("llama-cpp-python").level == logging.NOTSET:
        logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)  # what Llama(verbose=False) sets
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{quant}")
    params.nthread = os.cpu_count() or 1
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) != 0:
        raise Unsupported(f"llama.cpp could not quantize {src.name} to {quant}")


def _dequantized(t) -> np.ndarray:
    from gguf import quants  # heavy: imported when a GGUF is written

    shape = tuple(int(n) for n in reversed(t.shape))
    return quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False).reshape(shape)


def adapter_deltas(base, adapters: list[tuple]) -> dict[str, np.ndarray]:
    """{GGUF tensor name: sum_i w_i * scale_i * B_i @ A_i} in the base's GGUF layout.
    `adapters`: (AdapterFiles, state, weight, ignored targets)."""
    deltas: dict[str, np.ndarray] = {}
    for files, state, weight, ignored in adapters:
        if files.format == "gguf":
            raise Unsupported(f"{files.name}: merging a GGUF LoRA file is not supported; export from its "
                                       "PEFT folder")
        for gname, a, b, scale in lora_pairs(files, state, base, ignored):
            delta = (weight * scale) * (b.astype(np.float64) @ a.astype(np.float64))
            deltas[gname] = deltas.get(gname, 0) + delta
    return {k: v.astype(np.float32) for k, v in deltas.items()}


def merge_into_gguf(reader, deltas: dict[str, np.ndarray], out: Path, progress: Progress = no_progress) -> dict:
    """Write the GGUF `reader` reads as an F32 GGUF with `deltas` added to their weights, keeping all of its
    metadata. Returns the changed tensors' original (dequantized) weights."""
    import gguf  # heavy: imported when a GGUF is written

    originals = {}
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(str(out), arch)
    for name, f in reader.fields.items():
        if name.startswith("GGUF.") or name in ("general.architecture", "general.file_type"):
            continue
        sub = f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, f.contents(), f.types[0], sub_type=sub)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    for i, t in enumerate(reader.tensors):
        release_pages(reader)
        data = _dequantized(t)
        gname = t.name[: -len(".weight")] if t.name.endswith(".weight") else None
        if gname in deltas:
            originals[gname] = data
            data = data + deltas[gname]
            if not np.isfinite(data).all():
                raise Unsupported(f"merge refused: non-finite values in {t.name}")
        writer.add_tensor(t.name, np.ascontiguousarray(data))
        if i % 50 == 0:
            progress(None, f"merged {i}/{len(reader.tensors)} tensors")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return originals


def release_pages(reader) -> None:
    """Drop the pages of a GGUF read so far from this process's resident memory. GGUFReader memory-maps the whole
    file, and every page a read touched would count until the reader is gone — the whole file by the end of a
    pass over its tensors (measured: +1.2 GB at 1.1B). They are clean, so the kernel just unmaps them; a later
    read finds them in the page cache."""
    mapping = getattr(reader.data, "_mmap", None)
    if mapping is not None and hasattr(mmap, "MADV_DONTNEED"):
        mapping.madvise(mmap.MADV_DONTNEED)


def kept_fraction(exported: Path, unmerged, delta, changed) -> float:
    """How much of the adapter's change the exported file keeps: the projection of (exported weights −
    base quantized the same way) on the intended delta, over the `changed` tensors (1 = all of it; at most
    KEPT_SAMPLE of them, evenly spread).
    `unmerged(name)` / `delta(name)` give a tensor's base weights and change in the GGUF layout, one tensor at a
    time. Where numpy cannot quantize that type (k-quants), the float base stands in for its quantized copy."""
    import gguf  # heavy: imported when a GGUF is written

    num = den = 0.0
    reader = gguf.GGUFReader(str(exported))
    tensors = [t for t in reader.tensors if t.name in changed]
    step = max(1, math.ceil(len(tensors) / KEPT_SAMPLE))
    for t in tensors[::step]:
        release_pages(reader)
        d, base = delta(t.name), unmerged(t.name)
        try:
            ref = gguf.quants.dequantize(gguf.quants.quantize(base, t.tensor_type), t.tensor_type).reshape(base.shape)
        except (NotImplementedError, ValueError, TypeError):
            ref = base
        num += float(np.sum((_dequantized(t) - ref).astype(np.float64) * d))
        den += float(np.sum(d.astype(np.float64) ** 2))
    return num / den if den else 1.0


def _file_type(reader) -> str:
    """'Q4_1', 'F32', ... from general.file_type ('' when absent or unknown)."""
    import gguf  # heavy: imported when a GGUF is written

    f = reader.fields.get("general.file_type")
    try:
        return gguf.LlamaFileType(f.contents()).name.removeprefix("MOSTLY_").removeprefix("ALL_") if f else ""
    except ValueError:
        return ""


def _out_file(out: Path, stem: str, loras: list[str], quant: str) -> Path:
    if out.suffix == ".gguf":
        target = out
    else:
        tag = "+".join(Path(n).name for n in loras)
        target = out / f"{stem}{'+' + tag if tag else ''}.{quant}.gguf"
    if target.exists():
        raise BadInput(f"{target} already exists; choose another --out")
    return target


def read_adapters(loras, weights, loras_dir: Path, base) -> list[tuple]:
    found = []
    for name, weight in zip(loras, weights):
        path = locate_adapter(name, loras_dir, anywhere=True)
        files = read_adapter(path, path.name)
        state = load_weights(files)
        report = inspect_adapter(files, state, base.description)
        if not report.compatible:
            raise Incompatible(report.summary(), report=report)
        found.append((files, state, float(weight), report.ignored_targets))
    return found


def export_gguf(model: str, loras: list[str], weights: list[float], out: Path, models_dir: Path, loras_dir: Path,
                quant: str | None = None, progress: Progress = no_progress) -> Path:
    if quant is not None and quant not in QUANTS:
        raise Unsupported(f"--quant {quant!r} is not one of: {', '.join(QUANTS)}")
    path, _ = models.resolve(model, "auto", Path(models_dir), progress)
    stem = path.stem.split(".")[0] if path.is_file() else path.name
    out = Path(out)
    if out.suffix == ".gguf" and out.exists():
        raise BadInput(f"{out} already exists; choose another --out")
    work_dir = out.parent if out.suffix == ".gguf" else out
    if path.is_file() and path.suffix == ".gguf":
        machine.check_fits("merging into a GGUF base", _gguf_merge_need(path, loras), work_dir, 2 * path.stat().st_size)
        work_dir.mkdir(parents=True, exist_ok=True)
        return _from_gguf_base(path, stem, loras, weights, out, work_dir, Path(loras_dir), quant, progress)
    return _from_transformers(model, path, stem, loras, weights, out, work_dir, Path(models_dir), Path(loras_dir),
                              quant, progress)


def _gguf_merge_need(path: Path, loras: list[str]) -> int:
    """The GGUF-base merge holds each changed tensor's float32 delta and original: up to 4 float32 copies of the
    model when every layer is targeted (this path is for small GGUF bases such as the embedded one)."""
    return int((machine.weights_size(path) * 4 if loras else 0) + machine.PROCESS_FLOOR)


def _from_gguf_base(path, stem, loras, weights, out, work_dir, loras_dir, quant, progress) -> Path:
    import gguf  # heavy: imported when a GGUF is written

    with tempfile.TemporaryDirectory(prefix=".gguf-export.", dir=work_dir) as tmp:
        merged = Path(tmp) / "merged.f32.gguf"
        reader = gguf.GGUFReader(str(path))
        base = read_base(path, reader=reader)
        adapters = read_adapters(loras, weights, loras_dir, base)
        deltas = adapter_deltas(base, adapters)
        progress(0.2, f"merging {', '.join(a[0].name for a in adapters) or 'nothing'} into {path.name}")
        originals = merge_into_gguf(reader, deltas, merged, progress)
        quant = quant or default_quant(base.parameters)
        base_type = _file_type(reader)
        if base_type not in ("F32", "F16", "BF16", quant) and quant not in ("F32", "F16", "BF16"):
            progress(0.8, f"note: the base is stored as {base_type}; re-quantizing its weights to {quant} adds "
                          "rounding error of its own (keep the base's type, or pick Q8_0/F16, to avoid it)")
        target = _out_file(out, stem, loras, quant)
        progress(0.85, f"quantizing to {quant}")
        changed = {f"{g}.weight": g for g in deltas}
        with write_into_place(target, folder=False) as part:
            quantize(merged, part, quant)
            _report_kept(part, quant, lambda n: originals[changed[n]], lambda n: deltas[changed[n]], changed, progress)
    progress(1.0, f"wrote {target}")
    return target


def _from_transformers(model, path, stem, loras, weights, out, work_dir, models_dir, loras_dir, quant,
                       progress) -> Path:
    """Merge and convert tensor by tensor (webui/export/hf_to_gguf.py). F32, F16, BF16 and Q8_0 are written
    directly; other types are llama.cpp's quantizer's, from a lossless file in the base's own type (BF16 for a
    bf16 base: the values a merged folder stores), which it reads memory-mapped."""
    quant = quant or default_quant(machine.parameters(path))
    direct = quant in FTYPES
    size = machine.weights_size(path)
    try:
        plan = streaming_plan(path, loras, weights, loras_dir)
    except NotStreamable as why:  # merged on a loaded copy first (it checks its own memory), then converted
        plan = None
        progress(0.05, f"{why}: merging on a loaded copy of the base")
    else:
        need = stream_merge.memory_need(path) + (0 if direct else size)  # llama.cpp maps the lossless file
        machine.check_fits(f"the GGUF export ({quant})", need, work_dir, size * (1 if direct else 2))
    work_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".gguf-export.", dir=work_dir) as tmp:
        if plan is None:
            path = export_safetensors(model, loras, weights, Path(tmp) / "merged-hf", models_dir, loras_dir, progress)
        converter = HfToGguf(path, plan)
        target = _out_file(out, stem, loras, quant)
        with write_into_place(target, folder=False) as part:
            if direct:
                progress(0.2, f"merging and writing {quant}, one tensor at a time")
                converter.write(part, quant, name=stem, progress=progress)
            else:
                lossless = _lossless_type(machine.source_dtype(path))
                progress(0.2, f"merging and writing {lossless}, one tensor at a time")
                staged = converter.write(Path(tmp) / f"merged.{lossless}.gguf", lossless, name=stem, progress=progress)
                progress(0.7, f"quantizing to {quant}")
                quantize(staged, part, quant)
                staged.unlink()
            if plan is not None and plan.changes:
                _report_kept(part, quant, converter.unmerged, converter.delta, set(converter.changed()), progress)
    progress(1.0, f"wrote {target}")
    return target


def _lossless_type(dtype: str) -> str:
    return {"bfloat16": "BF16", "float16": "F16"}.get(dtype, "F32")


def _report_kept(part: Path, quant: str, unmerged, delta, changed, progress: Progress) -> None:
    if not changed:
        return
    kept = kept_fraction(part, unmerged, delta, changed)
    message = f"{quant} keeps {kept:.0%} of the adapters' change to the weights"
    if kept < KEEP_AT_LEAST:
        message = (f"warning: {message}: quantizing to {quant} erases most of it (the change is smaller "
                   f"than the {quant} grid); use Q8_0, Q4_K_M or F16 instead")
        log.warning(message)
    progress(0.95, message)
