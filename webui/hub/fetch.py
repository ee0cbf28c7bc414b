"""Where a model or adapter comes from, decided in one place above the sources: `download(spec)` hands a
hub repository to webui/hub/download.py and an `s3://` URL or a local path to webui/hub/sources.py, and
`fetch_adapter(adapter_id, source)` answers LoRAX-style requests (`adapter_source` = hub | local | s3): a
hub or S3 adapter is fetched into the loras folder once and reused after (concurrent requests for the same
new one wait on one download: webui/atomic.py's lock); a local one must lie inside the loras folder when
the caller says so (the API does).
"""
from __future__ import annotations

import threading
from pathlib import Path

from webui.adapters.files import locate_adapter
from webui.atomic import dest_lock
from webui.errors import BadInput, NotFound
from webui.hub.download import download_hub
from webui.hub.files import ADAPTER_CONFIG, METADATA, REPO_ID, folder_name, parse_spec, read_metadata
from webui.hub.sources import copy_local, download_s3, s3_adapter_folder
from webui.progress import Progress

SOURCES = ("hub", "local", "s3")


def download(spec: str, *, branch: str | None = None, specific_files=(), exclude_pattern: str | None = None,
             threads: int = 4, output: Path | None = None, model_dir: Path = Path("models"),
             lora_dir: Path = Path("loras"), clean: bool = False, max_retries: int = 7, text_only: bool = False,
             token: str | None = None, require_lora: bool = False, progress: Progress | None = None,
             cancel: threading.Event | None = None) -> Path:
    """Download a model or adapter and return where it landed (a folder, or `models/X.gguf` for a single GGUF).

    spec: `ORG/NAME`, `ORG/NAME:BRANCH`, a hub URL (`https://HOST/ORG/NAME/resolve/BRANCH/FILE` fetches that
    file), `s3://bucket/prefix`, or an existing local folder/file (copied in). The keyword arguments are the
    CLI flags of the same names. `token` defaults to HF_TOKEN / the saved login; the hub is HF_ENDPOINT.
    `progress(fraction_or_None, message)` is called from worker threads a few times a second (None: a note,
    no new fraction). Setting `cancel` (a threading.Event) stops a hub download within a chunk, keeping what
    it has. Re-running resumes; `clean=True` starts over. Raises a LoraDeckError with a one-line message.
    """
    source = source_of(spec)
    if source == "s3":
        return download_s3(spec, model_dir=model_dir, lora_dir=lora_dir, output=output, clean=clean,
                           require_lora=require_lora, max_retries=max_retries, progress=progress)
    if source == "local":
        local = Path(spec).expanduser()
        if not local.exists():  # a path, not a hub id: say which
            raise NotFound(f"{spec}: no such file or folder on this machine")
        return copy_local(local, model_dir=model_dir, lora_dir=lora_dir, output=output, clean=clean,
                          require_lora=require_lora, progress=progress)
    return download_hub(spec, branch=branch, specific_files=specific_files, exclude_pattern=exclude_pattern,
                        threads=threads, output=output, model_dir=model_dir, lora_dir=lora_dir, clean=clean,
                        max_retries=max_retries, text_only=text_only, token=token, require_lora=require_lora,
                        progress=progress, cancel=cancel)


def source_of(spec: str) -> str:
    """Where a name given without its source comes from: `s3` (an s3:// URL), `local` (a path: it starts with
    '/', './', '../' or '~', or it exists here and is not shaped like a hub id) or `hub` (ORG/NAME[:BRANCH])."""
    if spec.startswith("s3://"):
        return "s3"
    if spec.startswith(("/", "./", "../", "~")):
        return "local"
    if Path(spec).expanduser().exists() and (spec.startswith(".") or not REPO_ID.match(spec)):
        return "local"
    return "hub"


def fetch_adapter(adapter_id: str, source: str = "hub", loras_dir: Path = Path("loras"),
                  progress: Progress | None = None, *, restrict_local: bool = True, refresh: bool = False) -> Path:
    """The folder of adapter `adapter_id` from `source` (hub | local | s3), fetched into `loras_dir` if needed.

    hub: `ORG/NAME[:BRANCH]` → `loras_dir/ORG_NAME[_BRANCH]`; s3: `s3://bucket/prefix` → `loras_dir/<last part
    of the prefix>`. Both are reused without network access once complete (`refresh=True` checks the source
    again). local: a name inside `loras_dir` or a folder path; with `restrict_local` (the API's setting) it
    must resolve inside `loras_dir`. The result holds an adapter_config.json.
    """
    loras_dir = Path(loras_dir)
    if source == "hub":
        repo, branch, _, _ = parse_spec(adapter_id)
        dest = loras_dir / folder_name(repo, branch)
        with dest_lock(dest):  # checked again under the lock: a request that waited finds it complete
            if not refresh and _complete(dest):
                return dest
            return download_hub(adapter_id, lora_dir=loras_dir, output=dest, require_lora=True, progress=progress)
    if source == "s3":
        with dest_lock(s3_adapter_folder(adapter_id, loras_dir)[0]):
            dest, complete = s3_adapter_folder(adapter_id, loras_dir)
            if complete and not refresh:
                return dest
            return download_s3(adapter_id, lora_dir=loras_dir, require_lora=True, progress=progress)
    if source == "local":
        path = locate_adapter(adapter_id, loras_dir, anywhere=not restrict_local)
        if not (path / ADAPTER_CONFIG).is_file():
            raise BadInput(f"{adapter_id}: {ADAPTER_CONFIG} is missing — not a PEFT adapter folder")
        return path
    raise BadInput(f"adapter_source {source!r} is not one of: {', '.join(SOURCES)}", param="adapter_source")


def _complete(dest: Path) -> bool:
    """Fetched from the hub earlier and finished: the metadata file is written last, and names every file."""
    if not (dest / ADAPTER_CONFIG).is_file() or not (dest / METADATA).is_file():
        return False
    return all((dest / f).is_file() for f in read_metadata(dest).get("sha256", {}))
