"""Paths that come from users, requests and remote listings stay inside their folder. Two checks, used
everywhere such a path arrives (adapter names and LoRAX `local` ids, extension names, the file names a hub
lists, the keys under an S3 prefix): `inside` for a path on disk (symlinks resolved), `safe_relative` for a
relative name before anything is written under it, and `child` for a plain file or folder name a user gives
for something the app writes (an export, an uploaded file)."""
from __future__ import annotations

from pathlib import Path

from webui.errors import BadInput


def inside(root: Path, path: Path) -> bool:
    """Does `path` lie strictly inside the folder `root`, after resolving `..` and symlinks?"""
    root, path = Path(root).resolve(), Path(path).resolve()
    return root in path.parents


def safe_relative(name: str) -> bool:
    """Is `name` a relative POSIX path that cannot leave the folder it is joined to (no absolute path, no
    '..', '.' or empty part, no backslash)?"""
    return bool(name) and "\\" not in name and not name.startswith("/") and \
        all(part not in ("..", ".", "") for part in name.split("/"))


def child(folder: Path, name: str, what: str = "name") -> Path:
    """`folder / name` for a plain name (no separator, not hidden); refused when that path, or a symlink already
    there, leads outside `folder`, so nothing is written through a link."""
    if not name or "/" in name or "\\" in name or name.startswith("."):
        raise BadInput(f"{what} {name!r}: give a plain name (no '/', not starting with '.')")
    path = Path(folder) / name
    if not inside(folder, path):
        raise BadInput(f"{what} {name!r} leads outside {folder}")
    return path
