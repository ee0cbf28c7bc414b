"""Putting an adapter from this machine into the loras folder: a folder given by its path (the LoRA panel's "Get
an adapter" with a path) and an upload from the browser (a .zip of an adapter folder, or the folder's files). Both
end in `install_folder`: the folder is read with the checks every adapter goes through (webui.adapters.files: a
LoRA config with sane numbers, a weights file whose tensors load and are finite) and copied in by the same
`copy_local` that `download-model.py /some/folder` uses (a hidden staging copy renamed at the end).

An upload may come from any browser that reaches the page, so it is held to more: a zip member with an absolute
path, a '..', a backslash, a link or a device is refused (nothing is written outside the unpacking folder), and
pickled weights (`adapter_model.bin`) are never read nor installed: safetensors only.
"""
from __future__ import annotations

import re
import shutil
import stat
import tempfile
import zipfile
from pathlib import Path, PurePosixPath

from webui.adapters.files import check_adapter_name, load_weights, read_adapter
from webui.adapters.types import BIN, CONFIG, SAFETENSORS
from webui.errors import BadInput, NotFound
from webui.hub.sources import copy_local, safe_name
from webui.paths import safe_relative
from webui.progress import Progress

UPLOADS = ".uploads"  # hidden unpacking folder inside the loras folder (same disk; listings skip it)
_JUNK = re.compile(r"(^|/)(__MACOSX|\.DS_Store|Thumbs\.db)(/|$)")  # what archivers add beside the files


def install_folder(src: Path, loras_dir: Path, name: str = "", *, pickles: bool = True,
                   progress: Progress | None = None) -> Path:
    """Check the adapter folder `src` and copy it into `loras_dir` as `name` (default: the folder's name).
    `pickles=False` (uploads) refuses an adapter whose only weights are `adapter_model.bin`. An adapter of that
    name already there is never replaced."""
    src, loras_dir = Path(src).expanduser(), Path(loras_dir)
    if not src.exists():
        raise NotFound(f"{src}: no such folder on this machine (a local source is a path)")
    if not src.is_dir():
        raise BadInput(f"{src}: not a folder (an adapter is a folder holding {CONFIG} and its weights)")
    name = (name or "").strip()
    if name:
        check_adapter_name(name, loras_dir)
    else:
        name = safe_name(src.name)
    files = read_adapter(src, name)  # the config: a LoRA with sane numbers; the weights file is there
    if files.format == "bin" and not pickles:
        raise BadInput(f"{name}: its weights are {BIN}, a Python pickle, which an upload never loads: upload "
                       f"{SAFETENSORS} (PEFT writes it by default; `save_pretrained(..., safe_serialization=True)` "
                       "converts an old adapter)")
    state = load_weights(files)  # truncated or corrupt files, pickled code (a local .bin), NaN or Inf
    if not any("lora_" in key for key in state):
        raise BadInput(f"{name}: {files.weights.name} holds no LoRA tensors (no lora_A / lora_B weights)")
    dest = loras_dir / name
    if dest.exists() or dest.is_symlink():
        raise BadInput(f"an adapter named {name!r} is already in the loras folder: give this one another name")
    return copy_local(src, lora_dir=loras_dir, output=dest, require_lora=True, progress=progress)


def install_local(path: str | Path, loras_dir: Path, progress: Progress | None = None) -> Path:
    """An adapter on this machine named by its path: a folder, or a .zip of one (unpacked as an upload is)."""
    src = Path(path).expanduser()
    if src.is_file() and src.suffix.lower() == ".zip":
        return install_upload([src], loras_dir, progress=progress)
    return install_folder(src, loras_dir, progress=progress)


def install_upload(paths: list, loras_dir: Path, name: str = "", progress: Progress | None = None) -> Path:
    """Install uploaded files: one `.zip` of an adapter folder (its files at the top or in one folder), or the
    adapter's files themselves (adapter_config.json + adapter_model.safetensors). The name defaults to the
    zip's folder or file name; loose files need one. Returns the adapter's folder in `loras_dir`."""
    paths = [Path(p) for p in paths or []]
    if not paths:
        raise BadInput("choose a .zip of an adapter folder, or its files (adapter_config.json + "
                       "adapter_model.safetensors), to upload")
    loras_dir = Path(loras_dir)
    (loras_dir / UPLOADS).mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=loras_dir / UPLOADS))
    try:
        zips = [p for p in paths if p.suffix.lower() == ".zip"]
        if zips:
            if len(paths) > 1:
                raise BadInput("upload one .zip on its own (or the adapter's files without a zip)")
            unpack_zip(zips[0], work, progress)
            folder, derived = adapter_root(work), zips[0].stem
        else:
            for p in paths:  # a browser sends file names only; keep the last part, whatever it claims
                target = work / PurePosixPath(p.name.replace("\\", "/")).name
                if target.name in ("", ".", "..") or target.exists():
                    raise BadInput(f"upload each file once, under a plain name ({p.name!r})")
                shutil.copyfile(p, target)
            folder, derived = adapter_root(work), ""
        if (folder / SAFETENSORS).is_file():
            (folder / BIN).unlink(missing_ok=True)  # safetensors wins (as when loading): the pickle stays out
        if folder != work:
            derived = folder.name  # the zip holds the adapter's folder: its name is the adapter's
        if not (name or "").strip() and not derived:
            raise BadInput("name the adapter: loose files carry no folder name")
        return install_folder(folder, loras_dir, (name or "").strip() or safe_name(derived), pickles=False,
                              progress=progress)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def unpack_zip(archive: Path, dest: Path, progress: Progress | None = None) -> None:
    """Unpack `archive` into `dest`, refusing (before writing anything) members that would land outside it or
    are not plain files and folders, and an archive larger than the free disk space."""
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as e:
        raise BadInput(f"{archive.name} is not a readable .zip ({e})") from None
    with zf:
        members = [m for m in zf.infolist() if not _JUNK.search(m.filename)]
        for m in members:
            rel = m.filename.rstrip("/") if m.is_dir() else m.filename
            if not safe_relative(rel) or re.match(r"^[A-Za-z]:", rel):
                raise BadInput(f"{archive.name}: refused, member {m.filename!r} would be written outside the "
                               "adapter's folder (an absolute path or '..')")
            kind = stat.S_IFMT(m.external_attr >> 16)
            if kind not in (0, stat.S_IFREG, stat.S_IFDIR):  # 0: written on a system without Unix modes
                what = "a link" if kind == stat.S_IFLNK else "not a plain file"
                raise BadInput(f"{archive.name}: refused, member {m.filename!r} is {what}")
        # each member is read no further than its stated size (zipfile stops there and checks the CRC)
        total = sum(m.file_size for m in members)
        free = shutil.disk_usage(dest).free
        if total > free:
            raise BadInput(f"{archive.name} unpacks to {total / 1e9:.1f} GB, more than the {free / 1e9:.1f} GB free")
        done = 0
        for m in members:
            target = dest / (m.filename.rstrip("/") if m.is_dir() else m.filename)
            if m.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                with zf.open(m) as src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
            except (zipfile.BadZipFile, RuntimeError, NotImplementedError, OSError) as e:  # CRC, encrypted, ...
                raise BadInput(f"{archive.name}: {m.filename} cannot be unpacked ({e})") from None
            done += m.file_size
            if progress:
                progress(done / max(total, 1), f"unpacking {m.filename}")


def adapter_root(folder: Path) -> Path:
    """The one folder under `folder` (itself included) that holds adapter_config.json."""
    found = sorted({p.parent for p in folder.rglob(CONFIG) if p.is_file()}, key=lambda p: len(p.parts))
    if not found:
        have = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())[:8]
        raise BadInput(f"not a PEFT adapter: no {CONFIG} in the upload (it holds: {', '.join(have) or 'nothing'})")
    if len(found) > 1:
        names = ", ".join(p.relative_to(folder).as_posix() or "." for p in found)
        raise BadInput(f"the upload holds {len(found)} adapters ({names}): upload one at a time")
    return found[0]
