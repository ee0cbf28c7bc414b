"""The adapter library: what the LoRA panel and `python -m webui loras ...` list and change in the loras folder.

Listing is a cheap scan (names, sizes, modification times and the few `adapter_config.json` fields a list
shows; no tensor is read), so a folder of hundreds of adapters lists in milliseconds; compatibility reports
are computed elsewhere, in the background (webui.adapters.report_cache). Management: rename, duplicate,
delete into `loras/.trash/` (undoable: restore), and notes and tags kept in `loradeck.json` beside the
adapter's files (inside its folder; `NAME.gguf.loradeck.json` next to a single-file GGUF LoRA), so they move,
copy and go to the trash with the adapter.

Every name is checked (`check_adapter_name`: a plain folder name) and every path stays inside the loras
folder. These are file operations only: whoever holds a loaded model (the Engine) must release an adapter
before its files move (`Engine.adapter_released`).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from webui.adapters.files import check_adapter_name, list_adapters
from webui.adapters.types import BIN, CONFIG, SAFETENSORS
from webui.atomic import write_text_into_place
from webui.errors import BadInput, NotFound
from webui.paths import inside

META = "loradeck.json"
TRASH = ".trash"
SORTS = ("name", "date", "rank", "size")
STATUSES = ("compatible", "incompatible", "pending")


@dataclass
class Entry:
    """One adapter as the list shows it, read without loading any tensor."""

    name: str
    kind: str            # "peft" | "gguf"
    size: int            # bytes of the files the adapter is made of
    mtime: float         # newest of those files
    signature: str       # changes whenever those files change (what cached reports are keyed by)
    rank: int | None = None
    alpha: float | None = None
    base: str = ""       # base_model_name_or_path from the config
    targets: list = field(default_factory=list)
    notes: str = ""
    tags: list = field(default_factory=list)
    error: str = ""      # a config that cannot be read (the full report says more)

    def to_dict(self) -> dict:
        return asdict(self)


# -- reading ------------------------------------------------------------------------------------------------
def adapter_files(path: Path) -> list[Path]:
    """The files an adapter is made of: config + weights (safetensors preferred, as when loading), or its GGUF
    file(s). Not the notes file, nor the GGUF conversions cached beside a PEFT adapter."""
    if path.is_file():
        return [path]
    if (path / CONFIG).is_file():
        weights = next((path / w for w in (SAFETENSORS, BIN) if (path / w).is_file()), None)
        return [path / CONFIG] + ([weights] if weights else [])
    return sorted(path.glob("*.gguf"))


def signature(files: list[Path]) -> str:
    h = hashlib.sha1()
    for p in files:
        st = p.stat()
        h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:16]


def meta_path(path: Path) -> Path:
    return path / META if path.is_dir() else path.with_name(path.name + "." + META)


def read_meta(path: Path) -> dict:
    try:
        data = json.loads(meta_path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # none yet, or hand-edited into nonsense: the adapter still lists
    return data if isinstance(data, dict) else {}


def _entry(path: Path) -> Entry:
    files = adapter_files(path)
    stats = [p.stat() for p in files]
    meta = read_meta(path)
    e = Entry(name=path.name, kind="peft" if (path / CONFIG).is_file() else "gguf",
              size=sum(s.st_size for s in stats), mtime=max((s.st_mtime for s in stats), default=0.0),
              signature=signature(files), notes=str(meta.get("notes") or ""),
              tags=[str(t) for t in meta.get("tags") or []])
    if e.kind == "peft":
        try:
            cfg = json.loads((path / CONFIG).read_text(encoding="utf-8"))
            e.rank, e.alpha = cfg.get("r"), cfg.get("lora_alpha", cfg.get("r"))
            e.base = str(cfg.get("base_model_name_or_path") or "")
            t = cfg.get("target_modules") or []
            e.targets = [t] if isinstance(t, str) else sorted({str(x).rsplit(".", 1)[-1] for x in t})
        except (OSError, ValueError, AttributeError) as err:
            e.error = f"{CONFIG} is unreadable ({err})"
    return e


def scan(loras_dir: Path) -> list[Entry]:
    """Every adapter in the folder (the Engine's list), with what the list shows. Cheap: no tensor is read."""
    out = []
    for name in list_adapters(Path(loras_dir)):
        try:
            out.append(_entry(Path(loras_dir) / name))
        except OSError:
            continue  # deleted while we looked
    return out


def get(loras_dir: Path, name: str) -> Entry:
    return _entry(_path(loras_dir, name))


def _path(loras_dir: Path, name: str) -> Path:
    """An existing adapter's path, refusing names that would leave the folder."""
    loras_dir = Path(loras_dir)
    check_adapter_name(name, loras_dir)
    path = loras_dir / name
    if not inside(loras_dir, path) or name not in list_adapters(loras_dir):
        have = ", ".join(list_adapters(loras_dir)) or "none"
        raise NotFound(f"adapter not found: {name} (adapters in {loras_dir}: {have})")
    return path


def _new_path(loras_dir: Path, name: str, like: Path) -> Path:
    """Where an adapter named `name` would go: a valid name, free, of the same kind as `like`."""
    loras_dir = Path(loras_dir)
    check_adapter_name(name, loras_dir)
    if like.is_file() and not name.endswith(".gguf"):
        name += ".gguf"  # a single-file GGUF LoRA is listed only with its suffix
    if like.is_dir() and name.endswith(".gguf"):
        raise BadInput(f"{name!r}: a folder adapter's name cannot end in .gguf (that names a GGUF LoRA file)")
    path = loras_dir / name
    if not inside(loras_dir, path):
        raise BadInput(f"adapter name {name!r} escapes the adapters folder {loras_dir}")
    if path.exists() or path.is_symlink() or meta_path(path).exists():
        raise BadInput(f"an adapter named {name} already exists: pick another name")
    return path


# -- changing -----------------------------------------------------------------------------------------------
def rename(loras_dir: Path, name: str, new_name: str) -> str:
    src = _path(loras_dir, name)
    dst = _new_path(loras_dir, new_name, src)
    side = meta_path(src)  # a folder's notes move with it; a GGUF file's sidecar is moved after it
    os.rename(src, dst)
    if side.exists():
        os.rename(side, meta_path(dst))
    return dst.name


def duplicate(loras_dir: Path, name: str, new_name: str) -> str:
    """A copy under a new name (notes and tags included; GGUF conversions cached beside a PEFT adapter are not
    copied, they are remade on use). Written under a hidden temporary name and renamed at the end, so a failed
    copy never shows up as an adapter."""
    src = _path(loras_dir, name)
    dst = _new_path(loras_dir, new_name, src)
    tmp = Path(loras_dir) / f".copy-{os.getpid()}-{dst.name}"
    try:
        if src.is_dir():
            shutil.copytree(src, tmp, symlinks=False, ignore=shutil.ignore_patterns("adapter.*.gguf"))
        else:
            shutil.copy2(src, tmp)
            if meta_path(src).exists():
                shutil.copy2(meta_path(src), meta_path(dst))
        os.rename(tmp, dst)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()
    return dst.name


@dataclass
class Trashed:
    id: str          # the folder under .trash/ (what `restore` takes)
    name: str        # the adapter's name when it was deleted
    deleted: float   # time of deletion (seconds since the epoch)


def delete(loras_dir: Path, name: str) -> Trashed:
    """Move the adapter (and its notes) into loras/.trash/ID/; nothing is erased, `restore` brings it back."""
    src = _path(loras_dir, name)
    trash = Path(loras_dir) / TRASH
    trash.mkdir(exist_ok=True)
    now = time.time()
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    for i in range(1000):  # two deletes in the same second get different ids
        slot = trash / (f"{stamp}-{name}" if i == 0 else f"{stamp}-{i}-{name}")
        try:
            slot.mkdir()
            break
        except FileExistsError:
            continue
    side = meta_path(src)
    os.rename(src, slot / src.name)
    if side.exists():  # a GGUF file's sidecar (a folder's notes went with the folder)
        os.rename(side, slot / side.name)
    (slot / ".deleted.json").write_text(json.dumps({"name": name, "deleted": now}), encoding="utf-8")
    return Trashed(slot.name, name, now)


def trash(loras_dir: Path) -> list[Trashed]:
    """What the trash holds, newest first."""
    root = Path(loras_dir) / TRASH
    out = []
    for slot in root.iterdir() if root.is_dir() else ():
        try:
            info = json.loads((slot / ".deleted.json").read_text(encoding="utf-8"))
            out.append(Trashed(slot.name, str(info["name"]), float(info["deleted"])))
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not one of ours
    return sorted(out, key=lambda t: -t.deleted)


def restore(loras_dir: Path, item: str, as_name: str | None = None) -> str:
    """Bring back a trashed adapter (`item`: a trash id, or an adapter name: its newest deletion), under its
    old name or `as_name`. Refused while an adapter of that name exists, so nothing is overwritten."""
    items = trash(loras_dir)
    found = next((t for t in items if t.id == item), None) or next((t for t in items if t.name == item), None)
    if found is None:
        have = ", ".join(f"{t.id}" for t in items) or "the trash is empty"
        raise NotFound(f"nothing named {item} in the trash ({have})")
    slot = Path(loras_dir) / TRASH / found.id
    src = slot / found.name
    dst = _new_path(loras_dir, as_name or found.name, src)
    side = meta_path(src) if src.is_file() else None
    os.rename(src, dst)
    if side is not None and side.exists():
        os.rename(side, meta_path(dst))
    shutil.rmtree(slot)
    return dst.name


def empty_trash(loras_dir: Path) -> int:
    """Erase everything in the trash for good; returns how many adapters were erased."""
    items = trash(loras_dir)
    for t in items:
        shutil.rmtree(Path(loras_dir) / TRASH / t.id)
    return len(items)


def _write_meta(path: Path, **changes) -> dict:
    meta = {**read_meta(path), **changes}
    target = meta_path(path)
    write_text_into_place(target, json.dumps(meta, indent=2, ensure_ascii=False))
    return meta


def set_notes(loras_dir: Path, name: str, notes: str) -> str:
    _write_meta(_path(loras_dir, name), notes=str(notes or "").strip())
    return name


def clean_tags(tags) -> list[str]:
    """Tags as typed ("a, b c" or a list): trimmed, lower-case, no duplicates, in order."""
    if isinstance(tags, str):
        tags = tags.replace(",", " ").split()
    out = []
    for t in tags:
        t = str(t).strip().lower()
        if len(t) > 64:
            raise BadInput(f"tag {t[:20]!r}... is longer than 64 characters")
        if t and t not in out:
            out.append(t)
    return out


def set_tags(loras_dir: Path, name: str, tags, add: bool = False, remove: bool = False) -> list[str]:
    """Replace the tags (or add / remove the given ones)."""
    path = _path(loras_dir, name)
    given, now = clean_tags(tags), clean_tags(read_meta(path).get("tags") or [])
    if add:
        given = now + [t for t in given if t not in now]
    elif remove:
        given = [t for t in now if t not in given]
    return _write_meta(path, tags=given)["tags"]


# -- finding ------------------------------------------------------------------------------------------------
def select(entries: list[Entry], query: str = "", base: str = "", status: str = "", sort: str = "name",
           statuses: dict | None = None) -> list[Entry]:
    """Filter and sort for the list. `query` matches name, tags and notes (every word must match); `base`
    the base the adapter names; `status` one of STATUSES, looked up in `statuses` (name -> status)."""
    words = (query or "").lower().split()
    statuses = statuses or {}

    def keep(e: Entry) -> bool:
        text = " ".join([e.name, *e.tags, e.notes]).lower()
        return (all(w in text for w in words) and (not base or e.base == base)
                and (not status or statuses.get(e.name, "pending") == status))

    keys = {"name": lambda e: e.name.lower(), "date": lambda e: -e.mtime, "rank": lambda e: -(e.rank or 0),
            "size": lambda e: -e.size}
    if sort not in keys:
        raise BadInput(f"sort must be one of {', '.join(SORTS)}, got {sort!r}")
    # newest / largest / highest rank first; the name breaks ties so the order is stable
    return sorted((e for e in entries if keep(e)), key=lambda e: (keys[sort](e), e.name.lower()))
