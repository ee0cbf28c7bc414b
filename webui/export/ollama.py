"""Export a folder an Ollama user can `ollama create NAME -f DIR/Modelfile` from: the original GGUF base
(hard-linked into the folder when the filesystem allows, else copied, so `FROM` names a file that exists),
the adapter or weighted stack as a GGUF LoRA (webui/export/gguf_lora_writer.py), and a Modelfile following
Ollama's documented syntax: `FROM ./base.gguf`, `ADAPTER ./lora.gguf` (paths relative to the Modelfile), the
chat template as a Go `TEMPLATE` (webui/export/ollama_template.py), the template's default `SYSTEM` prompt if
it adds one, and a `PARAMETER stop` line for each end-of-turn / end-of-sequence token.

    python -m webui export --format ollama --model BASE.gguf --lora A [--outtype f16] --out DIR
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from webui.adapters.gguf_lora import field_value, gguf_module
from webui.atomic import write_into_place
from webui.errors import BadInput
from webui.export.gguf_lora_writer import export_gguf_lora, gguf_base_path
from webui.export.ollama_template import translate
from webui.progress import Progress, no_progress

MODELFILE = "Modelfile"


def _link_or_copy(src: Path, dst: Path) -> str:
    try:
        os.link(src, dst)
        return "linked"
    except OSError:  # another filesystem, or links not allowed: a copy does the same job
        shutil.copy2(src, dst)
        return "copied"


def _token(reader, key: str) -> str:
    """The text of the special token whose id the GGUF stores under `key` ('' when there is none)."""
    tid = field_value(reader, key)
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tid is None or tokens is None:
        return ""
    tid = int(tid)
    return str(tokens.contents(tid)) if 0 <= tid < len(tokens.data) else ""


def _quoted(text: str) -> str:
    if '"""' in text:
        raise BadInput(f"cannot write {text[:40]!r}... into a Modelfile: it holds triple quotes")
    return f'"""{text}"""'


def modelfile(base_file: str, adapter_file: str | None, reader) -> tuple[str, str]:
    """(the Modelfile's text, a note about its template) for a base whose GGUF `reader` is given."""
    eos, eot = _token(reader, "tokenizer.ggml.eos_token_id"), _token(reader, "tokenizer.ggml.eot_token_id")
    bos = _token(reader, "tokenizer.ggml.bos_token_id")
    found, note = translate(field_value(reader, "tokenizer.chat_template", "") or "", bos, eos, (eot, eos))
    lines = ["# Written by LoRA Deck: ollama create NAME -f Modelfile", f"FROM ./{base_file}"]
    if adapter_file:
        lines.append(f"ADAPTER ./{adapter_file}")
    if found:
        lines.append(f"TEMPLATE {_quoted(found.template)}")
        if found.system:
            lines.append(f"SYSTEM {_quoted(found.system)}")
    stops = found.stops if found else [s for s in dict.fromkeys((eot, eos)) if s]
    lines += [f'PARAMETER stop "{s}"' for s in stops if '"' not in s]
    return "\n".join(lines) + "\n", note


def export_ollama(model: str, loras: list[str], weights: list[float], out: Path, models_dir: Path,
                  loras_dir: Path, outtype: str | None = None, progress: Progress = no_progress) -> Path:
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BadInput(f"{out} already exists and is not an empty folder; choose another --out")
    base = gguf_base_path(model, models_dir)
    with write_into_place(out) as tmp:
        how = _link_or_copy(base, tmp / base.name)
        progress(0.1, f"{how} {base.name} into the folder")
        adapter = export_gguf_lora(model, loras, weights, tmp, models_dir, loras_dir, outtype, progress) \
            if loras else None
        text, note = modelfile(base.name, adapter.name if adapter else None, gguf_module().GGUFReader(str(base)))
        progress(0.95, note)
        (tmp / MODELFILE).write_text(text, encoding="utf-8")
    progress(1.0, f"wrote {out}: ollama create NAME -f {out / MODELFILE}")
    return out
