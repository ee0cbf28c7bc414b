"""The remote loader: a serving engine reached over HTTP (`loader.py`), the connection (`http.py`) and one
module per engine's dialect (`engines/`)."""
