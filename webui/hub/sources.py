"""Sources besides the hub: S3 (`download_s3`: `s3://bucket/prefix`, read with boto3, which takes the standard
AWS variables: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_DEFAULT_REGION, AWS_PROFILE
and AWS_ENDPOINT_URL for S3-compatible stores) and a local folder or file (`copy_local`). S3 objects and
copied local folders arrive in a hidden temporary folder that is renamed into place only when complete, so
a half-fetched adapter is never listed. webui/hub/fetch.py chooses between these and the hub.
"""
from __future__ import annotations

import glob
import hashlib
import re
import shutil
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath

from webui.atomic import dest_lock, swap_into_place
from webui.errors import BadInput, DownloadFailed, NotFound
from webui.hub.files import ADAPTER_CONFIG
from webui.paths import safe_relative
from webui.progress import Progress

S3_METADATA = "s3-metadata.txt"


def safe_name(name: str) -> str:
    """A folder name the adapters folder accepts (letters, digits, '.', '_', '+', '-'; no leading dot)."""
    name = re.sub(r"[^A-Za-z0-9._+-]", "_", name).lstrip("._-")[:128]
    if not name:
        raise BadInput("cannot make a folder name out of an empty path")
    return name


def s3_adapter_folder(url: str, loras_dir: Path) -> tuple[Path, bool]:
    """(the folder `download_s3` puts the adapter at `url` in, whether it is there complete from that URL)."""
    bucket, prefix = _parse_s3(url)
    dest = Path(loras_dir) / safe_name(PurePosixPath(prefix).name if prefix else bucket)
    return dest, (dest / ADAPTER_CONFIG).is_file() and _read_s3_metadata(dest).get("url") == f"s3://{bucket}/{prefix}"


def _parse_s3(url: str) -> tuple[str, str]:
    m = re.match(r"^s3://([^/]+)/?(.*)$", url)
    if not m or not m.group(1):
        raise BadInput(f"{url!r} is not an S3 URL (expected s3://bucket/prefix)")
    return m.group(1), m.group(2).strip("/")


def _relative_key(key: str, prefix: str) -> str:
    """An object key below `prefix` as a relative path; keys that would leave the folder are refused."""
    rel = key[len(prefix):].lstrip("/") if prefix else key
    if not safe_relative(rel):
        raise DownloadFailed(f"unsafe object key {key!r}: it would leave the destination folder")
    return rel


def _s3_client(max_retries: int):
    import boto3  # slow to import (its service tables); only S3 sources need it
    from botocore.config import Config

    # boto3 reads the AWS_* variables itself (AWS_ENDPOINT_URL included, since botocore 1.31.57);
    # its "standard" retry mode backs off exponentially on throttling and transient errors.
    return boto3.client("s3", config=Config(retries={"max_attempts": max_retries + 1, "mode": "standard"}))


def _s3_error(e: Exception, url: str) -> DownloadFailed | NotFound:
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError  # see _s3_client

    if isinstance(e, NoCredentialsError):
        return DownloadFailed(f"{url}: no AWS credentials (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)")
    if isinstance(e, ClientError):
        code = e.response.get("Error", {}).get("Code", "")
        if code in ("NoSuchBucket", "404", "NoSuchKey"):
            return NotFound(f"{url}: not found ({code})")
        if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return DownloadFailed(f"{url}: access denied ({code}); check the AWS credentials")
        return DownloadFailed(f"{url}: {code}: {e.response.get('Error', {}).get('Message', '')}")
    if isinstance(e, BotoCoreError):
        return DownloadFailed(f"{url}: {' '.join(str(e).split())}")
    return DownloadFailed(f"{url}: {type(e).__name__}: {' '.join(str(e).split())[:200]}")


def download_s3(url: str, *, model_dir: Path = Path("models"), lora_dir: Path = Path("loras"), output: Path | None = None,
                clean: bool = False, require_lora: bool = False, max_retries: int = 7,
                progress: Progress | None = None) -> Path:
    """Copy everything under `s3://bucket/prefix` into `loras_dir/NAME` (when it holds adapter_config.json)
    or `models_dir/NAME`, NAME being the prefix's last part; a prefix naming one object (say a .gguf)
    lands as `models_dir/FILE`. Files already fetched by an interrupted run are kept. Returns the path."""
    from botocore.exceptions import BotoCoreError, ClientError  # see _s3_client

    bucket, prefix = _parse_s3(url)
    url = f"s3://{bucket}/{prefix}"  # one spelling (no trailing slash) for the metadata and comparisons
    s3 = _s3_client(max_retries)
    try:
        objects = [o for page in s3.get_paginator("list_objects_v2").paginate(
                       Bucket=bucket, Prefix=f"{prefix}/" if prefix else "")
                   for o in page.get("Contents", []) if not o["Key"].endswith("/")]
        single = None
        if not objects and prefix:
            head = s3.head_object(Bucket=bucket, Key=prefix)  # maybe the prefix is one object
            single = {"Key": prefix, "Size": head["ContentLength"], "ETag": head.get("ETag", "")}
    except (BotoCoreError, ClientError) as e:
        if isinstance(e, ClientError) and e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey"):
            raise NotFound(f"nothing at {url}") from None
        raise _s3_error(e, url) from None
    if single:
        rels = {PurePosixPath(prefix).name: single}
    else:
        rels = {_relative_key(o["Key"], prefix): o for o in objects}
    is_lora = ADAPTER_CONFIG in rels
    if require_lora and not is_lora:
        raise BadInput(f"{url} is not a LoRA adapter (no {ADAPTER_CONFIG} under it)")
    if single:
        dest = (Path(output) if output else Path(model_dir)) / safe_name(PurePosixPath(prefix).name)
    else:
        name = safe_name(PurePosixPath(prefix).name if prefix else bucket)
        dest = Path(output) if output else (Path(lora_dir) if is_lora else Path(model_dir)) / name
    with dest_lock(dest):  # one fetch per destination: a second caller waits, then finds it up to date
        return _fetch_s3(s3, url, bucket, rels, single, dest, clean=clean, progress=progress)


def _fetch_s3(s3, url: str, bucket: str, rels: dict, single: dict | None, dest: Path, *, clean: bool,
              progress: Progress | None) -> Path:
    """The objects `rels` (relative path → listing entry) into `dest`, through a staging copy swapped in whole."""
    from botocore.exceptions import BotoCoreError, ClientError  # see _s3_client
    from tqdm import tqdm

    if dest.exists() and not clean:
        recorded = _read_s3_metadata(dest)
        if single and dest.is_file() and dest.stat().st_size == single["Size"] and _md5_ok(dest, single["ETag"].strip('"')):
            return dest
        if recorded.get("url") == url and recorded["files"] == {r: o["ETag"].strip('"') for r, o in rels.items()}:
            return dest  # already complete and unchanged
        if recorded.get("url") != url:  # never overwrite what someone else put there
            raise DownloadFailed(f"{dest} already exists (not fetched from {url}); "
                                "pass --output to put this one elsewhere, or --clean to replace it")

    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = dest.parent / f".{dest.name}.partial"  # same name on every run: an interrupted one resumes here
    if clean and staging.exists():
        shutil.rmtree(staging)
    total = sum(o["Size"] for o in rels.values())
    done = 0
    etags, sha256s = {}, {}
    try:
        for rel, o in sorted(rels.items()):
            target = staging if single else staging / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            etag = o["ETag"].strip('"')
            if not (target.is_file() and target.stat().st_size == o["Size"] and _md5_ok(target, etag)):
                with tqdm(total=o["Size"], unit="B", unit_scale=True, desc=rel, disable=None) as bar:
                    def step(n, rel=rel, bar=bar):
                        bar.update(n)
                        if progress:
                            progress((done + bar.n) / max(total, 1), f"{rel}: {(done + bar.n) / 1e6:.1f} / {total / 1e6:.1f} MB")
                    # s3transfer writes to a temporary name and renames when the object is complete.
                    s3.download_file(bucket, o["Key"], str(target), Callback=step)
                if not (target.stat().st_size == o["Size"] and _md5_ok(target, etag)):
                    target.unlink()
                    raise DownloadFailed(f"{url}: {rel} arrived corrupted (size or MD5 differs from S3's)")
            done += o["Size"]
            etags[rel] = etag
            sha256s[rel] = _sha256(target)
    except (BotoCoreError, ClientError) as e:
        raise _s3_error(e, url) from None
    except OSError as e:
        if e.errno == 28:
            raise DownloadFailed(f"no disk space left in {dest.parent}") from None
        raise DownloadFailed(f"{url}: {e}") from None
    if not single:
        _drop_strays(staging, set(rels))
        _write_s3_metadata(staging, url, etags, sha256s)
    swap_into_place(staging, dest)
    for stray in dest.parent.glob(f"{glob.escape(staging.name)}.*"):  # s3transfer's temp file of a killed run
        stray.unlink(missing_ok=True)
    if progress:
        progress(1.0, f"done: {dest}")
    return dest


def _md5_ok(path: Path, etag: str) -> bool:
    """S3's ETag is the object's MD5 unless it was a multipart upload (then it has a '-': not checkable)."""
    if "-" in etag or not re.fullmatch(r"[0-9a-f]{32}", etag):
        return True
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest() == etag


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _write_s3_metadata(folder: Path, url: str, etags: dict, sha256s: dict) -> None:
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    lines = [f"url: {url}", f"download date: {date}", "files (etag  sha256  path):"]
    lines += [f"    {etags[rel]}  {sha256s[rel]}  {rel}" for rel in sorted(etags)]
    (folder / S3_METADATA).write_text("\n".join(lines) + "\n", encoding="utf-8")


def _read_s3_metadata(folder: Path) -> dict:
    try:
        text = (folder / S3_METADATA).read_text(encoding="utf-8")
    except OSError:
        return {}
    out: dict = {"files": {}}
    for line in text.splitlines():
        if line.startswith("    "):
            etag, _sha, rel = line.strip().split("  ", 2)
            out["files"][rel] = etag
        elif line.startswith("url: "):
            out["url"] = line[5:].strip()
    return out


def _drop_strays(staging: Path, keep: set[str]) -> None:
    """Remove what is in the staging folder but not in the listing: s3transfer's temporary files (NAME.xxxxxxxx)
    left by a killed run, objects deleted since. The folder then holds exactly the prefix's objects."""
    for path in sorted(staging.rglob("*"), key=lambda q: -len(q.parts)):
        rel = path.relative_to(staging).as_posix()
        if path.is_file() and rel not in keep:
            path.unlink()
        elif path.is_dir() and not any(path.iterdir()):
            path.rmdir()


def copy_local(src: Path, *, model_dir: Path = Path("models"), lora_dir: Path = Path("loras"),
               output: Path | None = None, clean: bool = False, require_lora: bool = False,
               progress: Progress | None = None) -> Path:
    """`download-model.py /some/folder` (or a .gguf file): copy it into the loras folder (it holds
    adapter_config.json) or the models folder, through a hidden staging copy renamed at the end. An existing
    destination is replaced only with `clean`."""
    src = Path(src).resolve()
    is_lora = src.is_dir() and (src / ADAPTER_CONFIG).is_file()
    if require_lora and not is_lora:
        raise BadInput(f"{src} is not a LoRA adapter folder (no {ADAPTER_CONFIG})")
    if output:
        dest = Path(output) if src.is_dir() else Path(output) / safe_name(src.name)
    else:
        dest = (Path(lora_dir) if is_lora else Path(model_dir)) / safe_name(src.name)
    if dest.resolve() == src:
        return dest
    if dest.exists() and not clean:
        raise DownloadFailed(f"{dest} already exists; pass --output to put the copy elsewhere, or --clean to replace it")
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = dest.parent / f".{dest.name}.partial"
    if staging.is_dir():
        shutil.rmtree(staging)
    if progress:
        progress(None, f"copying {src} → {dest}")
    try:
        if src.is_dir():
            shutil.copytree(src, staging, ignore=shutil.ignore_patterns(".*"))
        else:
            shutil.copyfile(src, staging)
    except OSError as e:
        shutil.rmtree(staging, ignore_errors=True) if staging.is_dir() else staging.unlink(missing_ok=True)
        raise DownloadFailed(f"copying {src}: {e.strerror or e}") from None
    swap_into_place(staging, dest)
    if progress:
        progress(1.0, f"done: {dest}")
    return dest
