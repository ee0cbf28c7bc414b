"""The llama-server command line that serves a GGUF base with a chosen set of our adapters, for the remote loader:
llama-server cannot load adapters at run time, so they are given at its start, converted to GGUF LoRAs by our
own converter (webui/adapters/gguf_lora.py, cached beside each adapter). This llama.cpp version takes the
list comma-separated in one `--lora` (a repeated `--lora` keeps only the last), and `--lora-init-without-apply`
starts them at scale 0 so each request picks its own with `lora: [{id, scale}]`.

    python -m webui llama-server-command --model tiny.gguf --lora A B [--port 8080]
"""
from __future__ import annotations

import shlex
from pathlib import Path

from webui.errors import BadInput


def convert_for_llama_server(base_gguf: Path, adapter_dirs: list[Path]) -> list[Path]:
    """Our GGUF LoRA conversion of each adapter for `base_gguf` (a PEFT folder is converted once and cached; a GGUF
    LoRA is used as it is). Refuses an adapter that does not fit the base."""
    from webui.adapters.files import load_weights, read_adapter
    from webui.adapters.gguf_lora import cached_conversion, find_gguf_lora, read_base
    from webui.adapters.inspect import inspect_adapter

    base = read_base(Path(base_gguf))
    out = []
    for folder in adapter_dirs:
        gguf = find_gguf_lora(folder)
        if gguf is not None:
            out.append(gguf)
            continue
        files = read_adapter(folder, Path(folder).name)
        state = load_weights(files)
        report = inspect_adapter(files, state, base.description)
        if not report.compatible:
            raise BadInput(f"{files.name} does not fit {Path(base_gguf).name}: {report.summary()}")
        out.append(cached_conversion(files, state, base, report.ignored_targets))
    return out


def command(binary: str, base_gguf: Path, loras: list[Path], port: int = 8080, host: str = "127.0.0.1",
            extra: tuple = ()) -> list[str]:
    """The argument list that starts llama-server on `base_gguf` with `loras` (all at scale 0 until a request
    or POST /lora-adapters picks them)."""
    args = [binary, "-m", str(base_gguf), "--host", host, "--port", str(port)]
    if loras:
        if any("," in str(p) for p in loras):
            raise BadInput("llama-server takes the adapters comma-separated: rename files whose path holds a comma")
        args += ["--lora", ",".join(str(p) for p in loras), "--lora-init-without-apply"]
    return args + list(extra)


def printable(args: list[str]) -> str:
    return shlex.join(args)
