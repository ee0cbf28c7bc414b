"""The transformers family of loaders: plain transformers (float, bitsandbytes), GPTQ, and what they share —
the continuous batch (`continuous.py`), per-row sampling (`sampling.py`), the few-rows product
(`few_rows.py`), constrained decoding (`grammar.py`) and GPTQ quantizing (`gptq_quantize.py`)."""
