"""Options: every setting's one definition (dataclasses with defaults, choices and help in `config.py`), the
command-line flags derived from them (`flags.py`), LoRA option validators (`lora_options.py`) and generation
presets (`presets.py`)."""
