"""Export: merge adapters into a base and write a model that loads with no adapter, or write the adapters
themselves for llama.cpp / Ollama (gguf-lora, ollama; run.py dispatches on the format), plus the converters and quantizers the writers share: hf_to_gguf.py (a transformers folder →
GGUF) and gptq_quantize.py (GPTQModel; also used for the embedded model's GPTQ copy). Nothing is imported
here, so the leaf modules stay leaves."""

import typing

from webui.options.commands import ExportFormat

FORMATS = typing.get_args(ExportFormat)  # what `export --format` offers (run.py dispatches on it)
