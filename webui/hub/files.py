"""What to download and where, decided from a repository's file list alone (no network here): parsing
`ORG/NAME[:BRANCH]` or a `https://HOST/ORG/NAME/resolve/BRANCH/FILE` URL, picking the files the way
text-generation-webui does (safetensors over `.bin`/`.pt`, one GGUF quantization — `Q4_K_M` first —
out of many, tokenizer and text files alongside), naming the destination (`loras/ORG_NAME` for a repo
holding `adapter_config.json`, else `models/ORG_NAME`, `_BRANCH` appended off `main`), and reading and
writing `huggingface-metadata.txt`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import unquote, urlsplit

from webui.errors import BadInput, NotFound

METADATA = "huggingface-metadata.txt"
ADAPTER_CONFIG = "adapter_config.json"
PARTIAL = ".incomplete"  # suffix of a file being downloaded; models.list_models skips it

REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_TEXT = re.compile(r"\.(json|txt|md|py|jinja|tiktoken)$|(^|/)(tokenizer|spiece|ice)[^/]*\.model$", re.I)
_BIN = re.compile(r"(^|/)(pytorch_model|adapter_model|gptq_model|model)[^/]*\.bin$", re.I)
_WEIGHTS = re.compile(r"\.(safetensors|pt|pth|gguf)$", re.I)
# The usual GGUF quantization labels; a repo offering several gets the first of these it has.
# Q4_K_M first: the common default (text-generation-webui, LM Studio) trading ~4.8 bits/weight for quality.
GGUF_PREFERENCE = ("Q4_K_M", "Q4_K_S", "Q5_K_M", "Q5_K_S", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q6_K",
                   "Q8_0", "IQ4_XS", "IQ4_NL", "Q3_K_L", "Q3_K_M", "Q3_K_S", "Q2_K", "BF16", "F16", "F32")
_QUANT = re.compile(r"(?<![A-Za-z0-9])(I?Q\d_[A-Z0-9]+(?:_[SMLX]+)?|Q\d_K|BF16|F16|F32)(?![A-Za-z0-9])", re.I)


@dataclass(frozen=True)
class RemoteFile:
    """One file of the repo at a commit: size, and the hashes the hub publishes for it."""
    path: str
    size: int
    sha256: str | None  # the LFS sha256 (large files); None for plain git files
    blob_id: str | None  # the git blob sha1 (every file)


@dataclass
class Selection:
    files: list[RemoteFile]
    is_lora: bool
    single_file: bool  # one --specific-file .gguf: lands directly in the models dir
    notes: list[str] = field(default_factory=list)  # what was chosen and why, to print


def parse_spec(spec: str, branch: str | None = None) -> tuple[str, str, list[str], str | None]:
    """`ORG/NAME[:BRANCH]` or a hub URL → (repo_id, branch, files named by the URL, endpoint named by the URL).
    A `--branch` flag overrides nothing given in the spec itself; both empty means `main`."""
    spec = spec.strip()
    files: list[str] = []
    endpoint = None
    if spec.startswith(("http://", "https://")):
        parts = urlsplit(spec)
        endpoint = f"{parts.scheme}://{parts.netloc}"
        segs = [unquote(s) for s in parts.path.strip("/").split("/")]
        if len(segs) < 2:
            raise BadInput(f"{spec}: not a repository URL (expected https://HOST/ORG/NAME[/resolve/BRANCH/FILE])")
        repo, rest = "/".join(segs[:2]), segs[2:]
        if rest and rest[0] in ("resolve", "blob", "tree") and len(rest) >= 2:
            branch = rest[1]
            if rest[0] != "tree" and len(rest) >= 3:
                files = ["/".join(rest[2:])]
    else:
        repo = spec
        if ":" in spec:
            repo, spec_branch = spec.split(":", 1)
            branch = spec_branch or branch
    repo = repo.strip("/")
    if not REPO_ID.match(repo) or ".." in repo:
        raise BadInput(f"{repo!r} is not a hub repository id (expected ORG/NAME)")
    return repo, branch or "main", files, endpoint


def folder_name(repo: str, branch: str) -> str:
    """`org/name` on `branch` → `org_name` (main) or `org_name_branch` (text-generation-webui's naming)."""
    name = "_".join(repo.split("/")[-2:])
    if branch != "main":
        name += "_" + re.sub(r"[^A-Za-z0-9._+-]", "_", branch)
    return name


def quant_of(path: str) -> str | None:
    m = _QUANT.search(Path(path).name) or _QUANT.search(path)  # the label may be on the folder only
    return m.group(1).upper() if m else None


def _choose_gguf(ggufs: list[RemoteFile]) -> tuple[list[RemoteFile], str]:
    """One quantization out of several (all parts of a split file kept together)."""
    by_quant: dict[str | None, list[RemoteFile]] = {}
    for f in ggufs:
        by_quant.setdefault(quant_of(f.path), []).append(f)
    for q in GGUF_PREFERENCE:
        if q in by_quant:
            return by_quant[q], q
    # No known label: the smallest file (the likeliest to fit), named so the user can ask for another.
    smallest = min(ggufs, key=lambda f: f.size)
    return [smallest], Path(smallest.path).name


def select_files(files: list[RemoteFile], specific: list[str] = (), exclude: str | None = None,
                 text_only: bool = False) -> Selection:
    """The files to fetch, or BadInput / NotFound with a one-line reason (nothing usable, a named file missing)."""
    by_path = {f.path: f for f in files}
    is_lora = ADAPTER_CONFIG in by_path
    exclude_re = re.compile(exclude) if exclude else None
    if specific:
        missing = [s for s in specific if s not in by_path]
        if missing:
            raise NotFound(f"not in the repository: {', '.join(missing)} (it has: {_names(files)})")
        chosen = [by_path[s] for s in dict.fromkeys(specific)]
        single = len(chosen) == 1 and chosen[0].path.lower().endswith(".gguf")
        return Selection(chosen, is_lora=is_lora, single_file=single)

    notes: list[str] = []
    # Top-level files; GGUF files also from sub-folders (split quantizations often live in one each).
    candidates = [f for f in files if "/" not in f.path or f.path.lower().endswith(".gguf")]
    if exclude_re:
        candidates = [f for f in candidates if not exclude_re.search(f.path)]
    text = [f for f in candidates if _TEXT.search(f.path) and "/" not in f.path]
    if text_only:
        if not text:
            raise BadInput(f"nothing usable: no text files (it has: {_names(files)})")
        return Selection(text, is_lora=is_lora, single_file=False)

    weights = [f for f in candidates if _WEIGHTS.search(f.path) or _BIN.search(f.path)]
    ggufs = [f for f in weights if f.path.lower().endswith(".gguf")]
    safetensors = [f for f in weights if f.path.lower().endswith(".safetensors")]
    if safetensors:
        # Mistral-style repos carry both sharded model-*.safetensors and a consolidated copy: keep the former.
        if any(not Path(f.path).name.startswith("consolidated") for f in safetensors):
            safetensors = [f for f in safetensors if not Path(f.path).name.startswith("consolidated")]
        dropped = [f for f in weights if f.path.lower().endswith((".bin", ".pt", ".pth"))]
        if dropped:
            notes.append(f"safetensors preferred: skipping {_names(dropped)}")
        weights = safetensors
        if ggufs:
            notes.append(f"transformers weights found: skipping GGUF files {_names(ggufs)} (ask with --specific-file)")
    elif ggufs and len(ggufs) < len(weights):
        weights = [f for f in weights if not f.path.lower().endswith(".gguf")]
        notes.append(f"transformers weights found: skipping GGUF files {_names(ggufs)} (ask with --specific-file)")
    elif len(ggufs) > 1:
        chosen, label = _choose_gguf(ggufs)
        others = [f for f in ggufs if f not in chosen]
        notes.append(f"several GGUF files: taking {_names(chosen)} ({label}); others (use --specific-file): "
                     f"{_names(others)}")
        weights = chosen
    if not weights:
        raise BadInput(f"nothing usable: no safetensors, .bin, .pt or .gguf weights (it has: {_names(files)})")
    return Selection(text + weights, is_lora=is_lora, single_file=False, notes=notes)


def _names(files: list[RemoteFile]) -> str:
    return ", ".join(f.path for f in files) or "nothing"


def metadata_text(url: str, branch: str, commit: str, sha256s: dict[str, str]) -> str:
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    lines = [f"url: {url}", f"branch: {branch}", f"commit: {commit}", f"download date: {date}", "sha256sum:"]
    lines += [f"    {sha}  {path}" for path, sha in sorted(sha256s.items())]
    return "\n".join(lines) + "\n"


def read_metadata(folder: Path) -> dict:
    """The fields of a folder's huggingface-metadata.txt (`sha256` maps file → hash); {} when absent."""
    try:
        text = (Path(folder) / METADATA).read_text(encoding="utf-8")
    except OSError:
        return {}
    out: dict = {"sha256": {}}
    for line in text.splitlines():
        if line.startswith("    ") and "  " in line.strip():
            sha, path = line.strip().split("  ", 1)
            out["sha256"][path] = sha
        elif ": " in line:
            key, value = line.split(": ", 1)
            out[key.strip()] = value.strip()
    return out
