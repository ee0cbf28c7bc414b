"""The command line of `python download-model.py` / `python -m webui download`: text-generation-webui's
flags, mapped onto `webui.hub.download.download` and `check`; prints notes and one-line errors.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from webui.errors import LoraDeckError
from webui.hub.download import check
from webui.hub.fetch import download


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """text-generation-webui's download-model.py flags."""
    parser.add_argument("repo", help="ORG/NAME[:BRANCH], a hub URL (…/resolve/BRANCH/FILE), s3://bucket/prefix, or a local path")
    parser.add_argument("--branch", help="branch, tag or commit (default main; ORG/NAME:BRANCH works too)")
    parser.add_argument("--specific-file", action="append", default=[], metavar="FILE",
                        help="download only this file (repeatable); a single .gguf lands as MODEL_DIR/FILE")
    parser.add_argument("--exclude-pattern", metavar="REGEX", help="skip files whose path matches this regex")
    parser.add_argument("--threads", type=int, default=4, help="files downloaded at once (default 4)")
    parser.add_argument("--output", type=Path, help="put the files in this folder instead")
    parser.add_argument("--model-dir", type=Path, default=Path("models"), help="models folder (default models)")
    parser.add_argument("--lora-dir", type=Path, default=Path("loras"), help="adapters folder (default loras)")
    parser.add_argument("--clean", action="store_true", help="do not resume: fetch every file again")
    parser.add_argument("--check", action="store_true", help="only verify the sha256 of the files on disk")
    parser.add_argument("--max-retries", type=int, default=7, help="attempts per file after the first (default 7)")
    parser.add_argument("--text-only", action="store_true", help="only the text files (configs, tokenizer, README)")


def run_cli(args: argparse.Namespace) -> int:
    for name in ("httpx2", "httpx", "botocore", "boto3", "s3transfer"):  # one line per request is noise here
        logging.getLogger(name).setLevel(logging.WARNING)

    def show(fraction, message):  # byte counts are on the tqdm bars; print the notes
        if fraction is None:
            print(f"[download] {message}", file=sys.stderr)

    kwargs = dict(branch=args.branch, specific_files=args.specific_file, exclude_pattern=args.exclude_pattern,
                  text_only=args.text_only, output=args.output, model_dir=args.model_dir, lora_dir=args.lora_dir)
    try:
        if args.check:
            problems = check(args.repo, **kwargs)
            for line in problems:
                print(line, file=sys.stderr)
            if problems:
                print(f"error: {len(problems)} file(s) failed the check: "
                      + ", ".join(line.split(": ", 1)[1] for line in problems), file=sys.stderr)
                return 1
            print("all files match the hub's checksums")
            return 0
        out = download(args.repo, **kwargs, threads=args.threads, clean=args.clean, max_retries=args.max_retries,
                       progress=show)
    except LoraDeckError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    print(out)
    return 0
