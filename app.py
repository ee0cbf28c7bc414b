"""Start LoRA Deck: the web UI at / and the API at /v1 (see `python app.py --help`)."""
import sys

from webui.cli import serve_main

if __name__ == "__main__":
    sys.exit(serve_main())
