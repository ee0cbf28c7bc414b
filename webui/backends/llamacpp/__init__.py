"""The llama.cpp family: the GGUF loader (`loader.py`), its continuous batch (`batch.py`) and the command that
starts llama.cpp's own server on the same files (`server_cmd.py`)."""
