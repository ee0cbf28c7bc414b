"""Command line of LoRA Deck: `python -m webui SUBCOMMAND`. `app.py` is `serve` and `download-model.py`
is `download`. The flags of `serve` come from `webui.config.ServerConfig`, so they, the defaults and
the help texts have one home.
"""
from __future__ import annotations

import argparse
import logging
import sys

from webui.config import ConfigError, ServerConfig, add_arguments, from_namespace


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m webui", description="LoRA Deck: local LLMs and LoRA adapters.")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="start the web UI (/) and the API (/v1); same as app.py")
    add_arguments(serve, ServerConfig)
    download = sub.add_parser("download", help="download a model or adapter; same as download-model.py")
    download.add_argument("repo", nargs="?")
    return parser


def main(argv: list[str] | None = None) -> int:
    args, extra = _parser().parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "serve":
        if extra:
            print(f"error: unrecognized arguments: {' '.join(extra)}", file=sys.stderr)
            return 2
        try:
            cfg = from_namespace(ServerConfig, args)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        from webui.server import serve
        return serve(cfg)
    if args.command == "download":
        print("not yet: downloading models and adapters comes with its own issue; "
              "put a model folder or .gguf file in models/ meanwhile", file=sys.stderr)
        return 2
    return 2


def serve_main() -> int:
    """`python app.py [flags]`."""
    return main(["serve", *sys.argv[1:]])


def download_main() -> int:
    """`python download-model.py REPO [flags]`."""
    return main(["download", *sys.argv[1:]])
