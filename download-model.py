"""Download a model or LoRA from the Hugging Face hub (text-generation-webui's command; see --help)."""
import sys

from webui.cli import download_main

if __name__ == "__main__":
    sys.exit(download_main())
