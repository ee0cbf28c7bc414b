"""`python download-model.py REPO[:BRANCH]` and the `download()` function behind it (the web UI's Model tab
calls the same function). Built on huggingface_hub's own pieces: `HfApi` for the commit and the file list
with each file's LFS sha256, `get_hf_file_metadata` (HEAD) and `http_get` (GET with `Range`) for the
bytes, so `HF_ENDPOINT`, `HF_TOKEN`, redirects to the CDN and the hub's error codes behave as they do
everywhere else. On top of that: each file goes to `NAME.incomplete`, resumes from there after an
interruption, is checked against the hub's sha256 (or git blob id for small files; hashed as the bytes are
written, never read back) and only then renamed to its final name; all files of a repo are in flight at once,
and the config that makes a folder loadable gets its name last; retries with exponential back-off; one-line
errors. One download per destination at a
time (a file lock); a folder already downloaded at another commit is updated through a hidden staging folder
(unchanged files hard-linked in, changed ones fetched) swapped in whole, so it is never a mix of commits.
`s3://` URLs and local paths are handled by `webui.hub.sources`; `webui.hub.fetch` chooses.

    python download-model.py TheBloke/Llama-2-7B-GGUF --specific-file llama-2-7b.Q4_K_M.gguf
    python download-model.py org/lora-adapter:dev --check
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import urlsplit

import httpx2  # huggingface_hub's HTTP client: its transport errors are the retryable ones
from huggingface_hub import HfApi, errors, get_hf_file_metadata, get_token, hf_hub_url
from huggingface_hub.file_download import http_get
from huggingface_hub.hf_api import RepoFile
from huggingface_hub.utils import build_hf_headers
from huggingface_hub.utils import tqdm as hf_tqdm

from webui.atomic import dest_lock, swap_into_place, write_text_into_place
from webui.errors import BadInput, DownloadFailed, NotFound
from webui.hub.checksums import HashingWriter, hashes, verify
from webui.hub.files import (
    ADAPTER_CONFIG,
    METADATA,
    PARTIAL,
    RemoteFile,
    folder_name,
    metadata_text,
    parse_spec,
    read_metadata,
    select_files,
)
from webui.paths import safe_relative
from webui.progress import Progress

_MARKERS = ("config.json", ADAPTER_CONFIG)  # fetched last: a folder is listed as a model/adapter only when whole


@dataclass
class Plan:
    repo: str
    branch: str
    commit: str
    endpoint: str
    files: list[RemoteFile]
    dest: Path  # the folder the files go in
    single_file: bool
    is_lora: bool
    notes: list[str]


def _endpoint(url_endpoint: str | None) -> str:
    """HF_ENDPOINT, read at call time; a URL's own host wins unless it is huggingface.co behind a mirror."""
    env = os.environ.get("HF_ENDPOINT", "").rstrip("/")
    if url_endpoint and not (env and url_endpoint.rstrip("/") == "https://huggingface.co"):
        return url_endpoint.rstrip("/")
    return env or "https://huggingface.co"


def _hub_error(e: Exception, repo: str, branch: str, token, endpoint: str = "") -> DownloadFailed | NotFound:
    """huggingface_hub's exceptions → one line a user can act on."""
    if isinstance(e, errors.GatedRepoError):
        return DownloadFailed(f"{repo} is a gated repository: accept its terms on the hub and set HF_TOKEN"
                             + (" (the token given has no access)" if _has_token(token) else ""))
    if isinstance(e, errors.RepositoryNotFoundError):
        return NotFound(f"repository not found: {repo} (or it is private: set HF_TOKEN)")
    if isinstance(e, errors.RevisionNotFoundError):
        return NotFound(f"branch or revision not found in {repo}: {branch}")
    if isinstance(e, errors.RemoteEntryNotFoundError):
        return NotFound(f"file not found in {repo}@{branch}: {e.response.url}")
    if isinstance(e, errors.OfflineModeIsEnabled):
        return DownloadFailed("HF_HUB_OFFLINE is set: unset it (or set HF_HUB_OFFLINE=0) to download")
    msg = " ".join(str(e).split())
    if isinstance(e, httpx2.TransportError):
        return DownloadFailed(f"cannot reach the hub at {endpoint or 'HF_ENDPOINT'}: {msg[:200]}")
    return DownloadFailed(f"{repo}: {type(e).__name__}: {msg[:300]}")


def plan(spec: str, *, branch: str | None = None, specific_files=(), exclude_pattern: str | None = None,
         text_only: bool = False, output: Path | None = None, model_dir: Path = Path("models"),
         lora_dir: Path = Path("loras"), token: str | None = None, require_lora: bool = False) -> Plan:
    """Ask the hub what `spec` holds at its branch's current commit and decide what goes where."""
    repo, branch, url_files, url_endpoint = parse_spec(spec, branch)
    endpoint = _endpoint(url_endpoint)
    api = HfApi(endpoint=endpoint, token=token)
    try:
        info = api.model_info(repo, revision=branch)
        entries = api.list_repo_tree(repo, revision=info.sha, recursive=True)
        files = [RemoteFile(e.path, e.size, e.lfs.sha256 if e.lfs else None, e.blob_id)
                 for e in entries if isinstance(e, RepoFile)]
    except Exception as e:  # every hub failure becomes one line
        raise _hub_error(e, repo, branch, token, endpoint) from None
    unsafe = [f.path for f in files if not safe_relative(f.path)]
    if unsafe:  # a misbehaving endpoint must not write outside the destination folder
        raise DownloadFailed(f"{repo}: refusing file names that leave the folder: {', '.join(unsafe[:3])}")
    if info.gated and not _has_token(token):
        raise DownloadFailed(f"{repo} is a gated repository: accept its terms on the hub and set HF_TOKEN")
    try:
        sel = select_files(files, [*url_files, *specific_files], exclude_pattern, text_only)
    except re.error as e:
        raise BadInput(f"--exclude-pattern {exclude_pattern!r} is not a valid regular expression: {e}") from None
    except (BadInput, NotFound) as e:
        raise type(e)(f"{repo}@{branch}: {e}") from None
    if require_lora and not sel.is_lora:
        raise BadInput(f"{repo} is not a LoRA adapter (no {ADAPTER_CONFIG})")
    if sel.single_file:
        dest = Path(output) if output else Path(model_dir)
    else:
        dest = Path(output) if output else (Path(lora_dir) if sel.is_lora else Path(model_dir)) / folder_name(repo, branch)
    return Plan(repo, branch, info.sha, endpoint, sel.files, dest, sel.single_file, sel.is_lora, sel.notes)


def _has_token(token) -> bool:
    return bool(token or get_token())


def _target(p: Plan, f: RemoteFile) -> Path:
    """Where a repo file goes; GGUF files from sub-folders (split quantizations) land at the folder's top,
    where the loaders look for them."""
    flat = p.single_file or f.path.lower().endswith(".gguf")
    return p.dest / (Path(f.path).name if flat else f.path)


class _Cancelled(Exception):
    """Raised inside a transfer (from its progress bar) to stop it; the `.incomplete` file stays for a resume."""


class _Tally:
    """Bytes done across all files (threads report here), turned into progress(fraction, message) calls;
    also carries the cancel flag every transfer checks between chunks."""

    def __init__(self, total: int, progress: Progress, cancel: threading.Event | None = None):
        self.total, self.progress, self.lock = max(total, 1), progress, threading.Lock()
        self.cancel = cancel or threading.Event()
        self.done: dict[str, int] = {}
        self.last = 0.0

    def set(self, path: str, n: int) -> None:
        with self.lock:
            self.done[path] = n
        self.report(path, force=True)

    def add(self, path: str, n: int) -> None:
        with self.lock:
            self.done[path] = self.done.get(path, 0) + n
        self.report(path)

    def report(self, path: str, force: bool = False) -> None:
        now = time.monotonic()
        if self.progress and (force or now - self.last > 0.25):  # a few updates a second is plenty for a page
            self.last = now
            done = sum(self.done.values())
            self.progress(min(done / self.total, 1.0), f"{path}: {done / 1e6:.1f} / {self.total / 1e6:.1f} MB")


def _bar_class(tally: _Tally, path: str):
    """huggingface_hub's own tqdm bar (sizes, rates) that also reports to the tally. http_get takes a bar
    class, not a callback, so a subclass per file is the smallest way to hear about its bytes."""
    class Bar(hf_tqdm):
        def update(self, n=1):
            if tally.cancel.is_set():
                raise _Cancelled(path)
            tally.add(path, n or 0)
            return super().update(n)
    return Bar


def _fetch(p: Plan, f: RemoteFile, token, max_retries: int, tally: _Tally, place: bool = True) -> str:
    """One file to its final name (resuming a `.incomplete` left by an earlier run); returns its sha256.
    With `place=False` the verified file stays at `NAME.incomplete` for the caller to rename (`_place`)."""
    final = _target(p, f)
    part = final.with_name(final.name + PARTIAL)
    final.parent.mkdir(parents=True, exist_ok=True)
    url = hf_hub_url(p.repo, f.path, revision=p.commit, endpoint=p.endpoint)
    for attempt in range(max_retries + 1):
        try:
            resume = part.stat().st_size if part.exists() else 0
            if resume > f.size:
                part.unlink()
                resume = 0
            tally.set(f.path, resume)
            meta = get_hf_file_metadata(url, token=token, endpoint=p.endpoint)
            headers = build_hf_headers(token=token)
            if urlsplit(meta.location).netloc != urlsplit(url).netloc:
                headers.pop("authorization", None)  # a signed CDN URL: the token stays on the hub
            with open(part, "ab") as fh:
                out = HashingWriter(fh, part, f)  # hashed as it streams: no second read of the file
                try:
                    http_get(meta.location, out, resume_size=resume, headers=headers, expected_size=f.size,
                             displayed_filename=f.path, tqdm_class=_bar_class(tally, f.path))
                except BaseException:
                    out.close()
                    raise
            sha256 = out.digest_if_matches(f)
            if sha256 is None:
                part.unlink()
                raise OSError(f"{f.path}: checksum mismatch after download")
            if place:
                os.replace(part, final)
            return sha256
        except (errors.RepositoryNotFoundError, errors.RevisionNotFoundError, errors.RemoteEntryNotFoundError) as e:
            raise _hub_error(e, p.repo, p.branch, token) from None
        except errors.HfHubHTTPError as e:
            status = e.response.status_code if e.response is not None else 0
            if 400 <= status < 500 and status not in (408, 429):  # refused, not flaky: retrying cannot help
                raise _hub_error(e, p.repo, p.branch, token) from None
            err = e
        except OSError as e:
            if e.errno == 28:  # ENOSPC
                raise DownloadFailed(f"no disk space left in {final.parent} while writing {f.path}") from None
            if isinstance(e, (PermissionError, IsADirectoryError, NotADirectoryError)):  # local, not flaky
                raise DownloadFailed(f"cannot write {e.filename or final}: {e.strerror}") from None
            err = e
        except httpx2.HTTPError as e:
            err = e
        if attempt == max_retries:
            raise DownloadFailed(f"{f.path}: gave up after {attempt + 1} attempt(s): "
                                f"{' '.join(str(err).split())[:200]}") from None
        delay = min(2 ** attempt, 30)  # exponential back-off: 1, 2, 4 ... 30 s between attempts
        note = f"{f.path}: {' '.join(str(err).split())[:120]}; retrying in {delay} s"
        if tally.progress:
            tally.progress(None, note)
        else:
            print(f"[download] {note}", file=sys.stderr)
        if tally.cancel.wait(delay):
            raise _Cancelled(f.path)
    raise AssertionError("unreachable")


def _place(p: Plan, f: RemoteFile) -> None:
    """Rename a file `_fetch(place=False)` verified to its final name."""
    final = _target(p, f)
    os.replace(final.with_name(final.name + PARTIAL), final)


def _partial_size(target: Path) -> int:
    part = target.with_name(target.name + PARTIAL)
    return part.stat().st_size if part.is_file() else 0


def _staging(p: Plan, old: dict, clean: bool) -> Path | None:
    """The hidden folder an update goes through, or None to download in place. In place: a first download
    (nothing is listed before its config arrives, last) or a repair at the same commit. Staged: a folder
    that already holds a finished download of another commit (or `--clean` over one), so that it keeps
    serving the old commit whole until the new one is complete. The name carries the commit, so a killed
    update resumes there; stale ones (another commit) are removed."""
    if p.single_file or not old.get("commit") or (old["commit"] == p.commit and not clean):
        return None
    stage = p.dest.parent / f".{p.dest.name}.{p.commit[:12]}.partial"
    for other in p.dest.parent.glob(f".{glob.escape(p.dest.name)}.*.partial"):
        if other != stage and other.is_dir():
            shutil.rmtree(other, ignore_errors=True)
    if clean:
        shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(exist_ok=True)
    if not clean:  # files the new commit shares with the old one are linked in, not fetched again
        for f in p.files:
            src, dst = _target(p, f), stage / _target(p, f).relative_to(p.dest)
            if dst.exists() or not src.is_file() or src.stat().st_size != f.size:
                continue
            if f.sha256 and old.get("sha256", {}).get(f.path) != f.sha256 or not f.sha256 and not verify(src, f):
                continue
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(src, dst)
            except OSError:  # a filesystem without hard links
                shutil.copy2(src, dst)
    return stage


def _hub_download(p: Plan, *, threads: int, clean: bool, max_retries: int, token, progress: Progress,
                  cancel: threading.Event | None) -> Path:
    old = read_metadata(p.dest) if not p.single_file else {}
    stage = _staging(p, old, clean)
    if stage is None:
        return _download_into(p, old, threads=threads, clean=clean, max_retries=max_retries, token=token,
                              progress=progress, cancel=cancel)
    _download_into(replace(p, dest=stage), {}, threads=threads, clean=False, max_retries=max_retries, token=token,
                   progress=progress, cancel=cancel)
    swap_into_place(stage, p.dest)
    if progress:
        progress(1.0, f"done: {p.dest}")
    return p.dest


def _download_into(p: Plan, old: dict, *, threads: int, clean: bool, max_retries: int, token, progress: Progress,
                   cancel: threading.Event | None) -> Path:
    todo, sha256s = [], {}
    for f in p.files:
        target = _target(p, f)
        part = target.with_name(target.name + PARTIAL)
        if clean:
            part.unlink(missing_ok=True)
        elif target.is_file() and target.stat().st_size == f.size and (
                old.get("sha256", {}).get(f.path, f.sha256) == f.sha256 if f.sha256 else verify(target, f)):
            # Finished earlier (it got its final name only after its hash matched): not fetched again.
            # Large (LFS) files are trusted by size and recorded hash; small ones are cheap to re-hash.
            sha256s[f.path] = f.sha256 or hashes(target)[0]
            continue
        todo.append(f)
    need = sum(f.size - _partial_size(_target(p, f)) for f in todo)
    created = not p.dest.exists()
    p.dest.mkdir(parents=True, exist_ok=True)
    try:
        return _fetch_all(p, todo, sha256s, need, threads=threads, max_retries=max_retries, token=token,
                          progress=progress, cancel=cancel)
    except DownloadFailed:
        if created:
            _tidy(p.dest)
        raise


def _tidy(folder: Path) -> None:
    """After a failure, remove what this run created and holds nothing: empty partial files, empty folders."""
    for part in folder.rglob("*" + PARTIAL):
        if part.stat().st_size == 0:
            part.unlink()
    for d in sorted((d for d in folder.rglob("*") if d.is_dir()), key=lambda d: -len(d.parts)) + [folder]:
        if not any(d.iterdir()):
            d.rmdir()


def _fetch_all(p: Plan, todo: list[RemoteFile], sha256s: dict, need: int, *, threads: int, max_retries: int,
               token, progress: Progress, cancel: threading.Event | None) -> Path:
    """Fetch `todo` (weights first, configs last) and write the metadata file."""
    free = shutil.disk_usage(p.dest).free
    if need > free:
        raise DownloadFailed(f"not enough disk space in {p.dest}: need {need / 1e9:.2f} GB, {free / 1e9:.2f} GB free")
    total = sum(f.size for f in p.files)
    tally = _Tally(total, progress, cancel)
    for f in p.files:
        if f.path in sha256s:
            tally.done[f.path] = f.size
    if progress:
        progress(None, f"{p.repo}@{p.branch} ({p.commit[:10]}): {len(todo)} of {len(p.files)} file(s), "
                       f"{need / 1e6:.1f} MB to fetch → {p.dest}")
    # Every file is fetched at once (a round trip per file costs as much as many MB here), weights first in
    # the queue; the config that makes the folder loadable is verified like the rest but only renamed to its
    # final name after every other file is in place, so the folder is listed only when whole.
    markers = [f for f in todo if f.path in _MARKERS]
    order = [f for f in todo if f.path not in _MARKERS] + markers
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        futures = [pool.submit(_fetch, p, f, token, max_retries, tally, f.path not in _MARKERS) for f in order]
        try:
            for f, fut in zip(order, futures):
                sha256s[f.path] = fut.result()
        except BaseException as e:  # a failure, Ctrl-C or cancel: stop the other transfers at their next chunk
            tally.cancel.set()
            pool.shutdown(wait=True, cancel_futures=True)
            if isinstance(e, _Cancelled):
                raise DownloadFailed("download cancelled; run it again to resume") from None
            raise
    for f in markers:
        _place(p, f)
    if not p.single_file:
        text = metadata_text(f"{p.endpoint}/{p.repo}", p.branch, p.commit, sha256s)
        write_text_into_place(p.dest / METADATA, text)
    if progress:
        progress(1.0, f"done: {p.dest if not p.single_file else _target(p, p.files[0])}")
    return p.dest if not p.single_file else _target(p, p.files[0])


def download_hub(spec: str, *, threads: int = 4, clean: bool = False, max_retries: int = 7, token: str | None = None,
                 progress: Progress | None = None, cancel: threading.Event | None = None, **plan_kwargs) -> Path:
    """`download` for a hub repo or URL only (never a local path or S3); `plan_kwargs` as in `plan`."""
    p = plan(spec, token=token, **plan_kwargs)
    for note in p.notes:
        if progress:
            progress(None, note)
    try:
        with dest_lock(p.dest if not p.single_file else _target(p, p.files[0])):
            return _hub_download(p, threads=threads, clean=clean, max_retries=max_retries, token=token,
                                 progress=progress, cancel=cancel)
    except OSError as e:  # the destination itself: unwritable, not a folder...
        raise DownloadFailed(f"cannot write {e.filename or p.dest}: {e.strerror or e}") from None


def check(spec: str, **plan_kwargs) -> list[str]:
    """Verify what is on disk against the hub's hashes (same file choice as `download`); returns the problems,
    one line each (`missing: F`, `checksum mismatch: F`), empty when every file is intact."""
    p = plan(spec, **plan_kwargs)
    problems = []
    for f in p.files:
        target = _target(p, f)
        if not target.is_file():
            problems.append(f"missing: {target}")
        elif verify(target, f) is None:
            problems.append(f"checksum mismatch: {target}")
    return problems
