"""Publishing an adapter folder (`loras/NAME`) or a merged export folder: to a Hugging Face repo
(`hf:ORG/NAME`: huggingface_hub's `create_repo` + `upload_folder`, token from the caller, HF_TOKEN or the saved
login, endpoint HF_ENDPOINT) or to `s3://bucket/prefix` (boto3, with the client, endpoint handling and error
wording of webui/hub/sources.py). An adapter folder without a README.md (or with only PEFT's empty template)
gets its model card first (webui/adapters/model_card.py), so what lands on the hub says what it is. The local
bookkeeping of a download (huggingface-metadata.txt, s3-metadata.txt) and hidden files stay home.

    python -m webui publish my-lora --to hf:me/my-lora --private
    python -m webui publish models/merged --to s3://bucket/team/merged
"""
from __future__ import annotations

import fnmatch
from pathlib import Path

from webui.adapters.files import locate_adapter
from webui.adapters.library import META as LIBRARY_META
from webui.adapters.model_card import CARD, needs_card, write_adapter_card
from webui.errors import BadInput, NotFound, Unauthorized, UploadFailed
from webui.hub.files import ADAPTER_CONFIG, METADATA, REPO_ID
from webui.hub.sources import S3_METADATA, _parse_s3, _s3_client, _s3_error
from webui.progress import Progress, no_progress

_DENIED = ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch")
# never uploaded (patterns on the path inside the folder): hidden files, download bookkeeping, and the library's
# private notes and tags (webui/adapters/library.py)
KEEP_HOME = [".*", "*/.*", METADATA, S3_METADATA, LIBRARY_META]


def publish(source: str, dest: str, *, loras_dir: Path = Path("loras"), runs_dir: Path = Path("runs"),
            evals_dir: Path | None = Path("user_data/evals"), token: str | None = None, private: bool = False,
            anywhere: bool = False, progress: Progress | None = None) -> str:
    """Upload the folder `source` (an adapter name in `loras_dir`, or with `anywhere` any folder path: the CLI)
    to `dest` (`hf:ORG/NAME` or `s3://bucket/prefix`); returns the URL it is at. `private` makes a new hub
    repo private (an existing repo keeps its visibility). Raises a LoraDeckError with a one-line message."""
    progress = progress or no_progress
    folder = _folder(source, Path(loras_dir), anywhere)
    if dest.startswith("hf:"):
        repo_id = dest[3:].strip("/")
        if not REPO_ID.match(repo_id):
            raise BadInput(f"{dest!r}: name the hub repo as hf:ORG/NAME")
        token = _hub_token(token)  # no token: said before the card is written or anything is sent
    elif dest.startswith("s3://"):
        _parse_s3(dest)  # a malformed URL is refused before anything is written
    else:
        raise BadInput(f"{dest!r}: publish to hf:ORG/NAME (the Hugging Face hub) or s3://bucket/prefix")
    if (folder / ADAPTER_CONFIG).is_file() and needs_card(folder):
        progress(None, f"writing the model card {folder.name}/{CARD}")
        write_adapter_card(folder, run_dir=Path(runs_dir) / folder.name if runs_dir else None,
                           evals_dir=evals_dir if evals_dir and Path(evals_dir).is_dir() else None)
    if dest.startswith("hf:"):
        return _to_hub(folder, repo_id, token, private, progress)
    return _to_s3(folder, dest, progress)


def _folder(source: str, loras_dir: Path, anywhere: bool) -> Path:
    source = (source or "").strip()
    if not source:
        raise BadInput("name the adapter (a folder in the adapters folder) to publish")
    path = Path(source).expanduser()
    if anywhere and path.is_dir() and not (loras_dir / source).is_dir():
        return path.resolve()  # a folder of the user's own, e.g. a merged export in models/
    folder = locate_adapter(source, loras_dir, anywhere=anywhere)
    if not folder.is_dir():
        raise BadInput(f"{source}: only folders are published (a GGUF LoRA file: put it in a folder first)")
    return folder


def _files(folder: Path) -> list[str]:
    """The paths (relative, POSIX) of the folder's files that are published."""
    rels = [p.relative_to(folder).as_posix() for p in sorted(folder.rglob("*")) if p.is_file()]
    return [r for r in rels if not any(fnmatch.fnmatch(r, pat) for pat in KEEP_HOME)]


def _hub_token(token: str | None) -> str:
    from huggingface_hub import get_token

    token = token or get_token()  # HF_TOKEN, else the login `hf auth login` saved
    if not token:
        raise Unauthorized("publishing to the hub needs a write token: set HF_TOKEN or pass --token "
                           "(create one at https://huggingface.co/settings/tokens)")
    return token


def _to_hub(folder: Path, repo_id: str, token: str, private: bool, progress: Progress) -> str:
    import httpx2  # huggingface_hub's HTTP client
    from huggingface_hub import HfApi, errors

    from webui.hub.download import _endpoint

    endpoint = _endpoint(None)
    api = HfApi(endpoint=endpoint, token=token)
    files = _files(folder)
    try:
        progress(0.0, f"creating {repo_id} on {endpoint}")
        url = api.create_repo(repo_id, private=private or None, exist_ok=True)  # None: the namespace default
        progress(0.1, f"uploading {len(files)} file(s) to {repo_id}")
        api.upload_folder(repo_id=repo_id, folder_path=folder, ignore_patterns=list(KEEP_HOME),
                          commit_message=f"Upload {folder.name} from LoRA Deck")
    except errors.HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        if status in (401, 403):
            raise Unauthorized(f"the hub refused the token for {repo_id} (HTTP {status}): it needs write access "
                               "to that namespace") from None
        if isinstance(e, errors.RepositoryNotFoundError):
            raise NotFound(f"{repo_id}: repository not found, and the token cannot create it") from None
        raise UploadFailed(f"{repo_id}: {' '.join(str(e).split())[:300]}") from None
    except errors.OfflineModeIsEnabled:
        raise UploadFailed("HF_HUB_OFFLINE is set: unset it (or set HF_HUB_OFFLINE=0) to publish") from None
    except (httpx2.HTTPError, OSError, ValueError) as e:  # unreachable endpoint, a card the hub refuses: one line
        raise UploadFailed(f"cannot publish to {endpoint}/{repo_id}: {type(e).__name__}: "
                           f"{' '.join(str(e).split())[:200]}") from None
    progress(1.0, f"published {folder.name} to {url}")
    return str(url)


def _to_s3(folder: Path, dest: str, progress: Progress) -> str:
    from boto3.exceptions import S3UploadFailedError  # slow imports: see sources._s3_client
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    bucket, prefix = _parse_s3(dest)
    url = f"s3://{bucket}/{prefix}".rstrip("/")
    files = _files(folder)
    total = sum((folder / r).stat().st_size for r in files) or 1
    s3, done = _s3_client(max_retries=5), 0
    try:
        s3.head_bucket(Bucket=bucket)  # a missing bucket or no access is said before anything is sent
        for rel in files:
            key = f"{prefix}/{rel}" if prefix else rel
            progress(done / total, f"{rel} → s3://{bucket}/{key}")
            try:
                s3.upload_file(str(folder / rel), bucket, key)  # s3transfer: multipart for large files
            except S3UploadFailedError as e:  # boto3 wraps the ClientError, which says what happened
                raise e.__context__ if isinstance(e.__context__, ClientError) else ClientError(
                    {"Error": {"Code": "UploadFailed", "Message": str(e)}}, "PutObject") from None
            done += (folder / rel).stat().st_size
    except (BotoCoreError, ClientError) as e:
        failed = _s3_error(e, url)  # the download's wording, then the upload's class
        code = e.response.get("Error", {}).get("Code", "") if isinstance(e, ClientError) else ""
        if isinstance(e, NoCredentialsError) or code in _DENIED:
            raise Unauthorized(str(failed)) from None
        raise (failed if isinstance(failed, NotFound) else UploadFailed(str(failed))) from None
    progress(1.0, f"published {folder.name} to {url}")
    return url
