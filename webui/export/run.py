"""`python -m webui export`: merge adapters into a base and write a model that loads on its loader with no
adapter, or write the adapters unmerged for llama.cpp / Ollama, in one of FORMATS. Each format has its writer
beside this module:

- `safetensors` (merged.py): a transformers folder;
- `gguf` (gguf_writer.py): a GGUF file for llama.cpp, `--quant` picks the type;
- `gptq` (gptq_writer.py): merge, then quantize with GPTQModel (`--bits`, `--group-size`, `--calibration`);
- `gguf-lora` (gguf_lora_writer.py): the adapter or weighted stack as one GGUF LoRA for the GGUF base (`--outtype`);
- `ollama` (ollama.py): a folder with the GGUF base, that GGUF LoRA and a Modelfile.

With no adapter it only converts or quantizes.
"""
from __future__ import annotations

from pathlib import Path

from webui.errors import BadInput
from webui.export import FORMATS
from webui.export.gguf_lora_writer import export_gguf_lora
from webui.export.gguf_writer import export_gguf
from webui.export.gptq_writer import export_gptq
from webui.export.merged import export_safetensors
from webui.export.ollama import export_ollama
from webui.progress import Progress, no_progress


def export_model(model: str, loras: list[str], weights: list[float] | None, fmt: str, out: Path,
                 models_dir: Path = Path("models"), loras_dir: Path = Path("loras"),
                 progress: Progress = no_progress, quant: str | None = None, bits: int = 4,
                 group_size: int | None = None, calibration: Path | None = None, outtype: str | None = None) -> Path:
    if fmt not in FORMATS:
        raise BadInput(f"--format {fmt!r} is not one of: {', '.join(FORMATS)}")
    weights = list(weights or [1.0] * len(loras))
    if len(weights) != len(loras):
        raise BadInput(f"{len(weights)} weight(s) given for {len(loras)} adapter(s)")
    out, models_dir, loras_dir = Path(out), Path(models_dir), Path(loras_dir)
    if fmt == "gguf-lora":
        return export_gguf_lora(model, loras, weights, out, models_dir, loras_dir, outtype, progress)
    if fmt == "ollama":
        return export_ollama(model, loras, weights, out, models_dir, loras_dir, outtype, progress)
    if fmt == "gguf":
        return export_gguf(model, loras, weights, out, models_dir, loras_dir, quant, progress)
    if fmt == "gptq":
        return export_gptq(model, loras, weights, out, models_dir, loras_dir, bits, group_size, calibration, progress)
    return export_safetensors(model, loras, weights, out, models_dir, loras_dir, progress)
