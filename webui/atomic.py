"""Writing into place: the guarantees every writer into the models, adapters, runs and user folders relies on
(downloads, exports, blends, training results, reports, caches). Nothing is ever half-written under its final
name: a writer works under a hidden name beside it and renames at the end, so a crash or a SIGKILL leaves the
old copy (or nothing) and a hidden leftover that the listings skip.

`write_into_place(dest)`: the one way to write a file or a folder: yields a hidden staging path beside `dest`,
which takes `dest`'s name when the block ends normally and is removed when it does not. `write_text_into_place`
is that for a text file.

`dest_lock(dest)`: one fetch per destination at a time. A file lock beside the destination (filelock, the
library huggingface_hub uses for its own cache) makes two API requests naming the same new adapter, or two
`download-model.py` processes, download it once: the second waits, then finds it complete.

`swap_into_place(staging, dest)`: a whole-folder switch. The finished staging folder and the old copy
exchange names in one `renameat2(RENAME_EXCHANGE)` call, so a reader, a crash or a SIGKILL sees the old
folder or the new one, never a mix and never nothing.
"""
from __future__ import annotations

import ctypes
import os
import shutil
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from filelock import FileLock

from webui.errors import DownloadFailed

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2  # linux/fs.h


def dest_lock(dest: Path) -> FileLock:
    """The lock for fetching into `dest` (a folder or a single file). Re-entrant in one thread (filelock
    returns the same object per path), exclusive across threads and processes. Its file lives in the hidden
    `.locks/` folder beside the destination, so the models and adapters folders hold only models and adapters
    (a lock file is never deleted: another process may be waiting on it, and a new file would not exclude it).
    DownloadFailed when the folder cannot be written."""
    dest = Path(dest)
    path = dest.parent / ".locks" / f"{dest.name}.lock"
    try:  # filelock retries an uncreatable lock file forever: find out now, and name the destination
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    except OSError as e:
        raise DownloadFailed(f"cannot write {dest}: {e.strerror or e}") from None
    return FileLock(path, is_singleton=True)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap the names `a` and `b` (Linux ≥ 3.15); False where the OS or filesystem cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    return renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def swap_into_place(staging: Path, dest: Path) -> None:
    """Put the finished `staging` (folder or file) at `dest`, replacing an older copy in one step."""
    if not (dest.exists() or dest.is_symlink()):
        os.replace(staging, dest)
        return
    if _exchange(staging, dest):
        _remove(staging)  # it holds the old copy now
        return
    # No atomic exchange here (not Linux, or a filesystem without it): two renames, the old copy kept
    # under a hidden name in between.
    old = dest.parent / f".{dest.name}.old-{os.getpid()}"
    os.replace(dest, old)
    os.replace(staging, dest)
    _remove(old)


@contextmanager
def write_into_place(dest: Path, folder: bool = True, replace: bool = False) -> Iterator[Path]:
    """Yield a hidden staging path in `dest`'s folder (a new empty folder, or with `folder=False` a file path not
    yet created) to write the result into; when the block ends normally the staging takes `dest`'s name in one
    rename, and whatever the block leaves behind on an error is removed. An existing `dest` is replaced in one
    step (`swap_into_place`) with `replace`; without it only an empty folder may stand there (a non-empty one
    makes the rename fail, and the user's files stay)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if folder:
        staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    else:  # pid and thread: two writers of the same file never share a staging name
        staging = dest.with_name(f".{dest.name}.{os.getpid()}.{threading.get_ident()}.partial")
    try:
        yield staging
        if replace:
            swap_into_place(staging, dest)
        else:
            os.replace(staging, dest)
    finally:
        if staging.exists() or staging.is_symlink():
            _remove(staging)


def write_text_into_place(path: Path, text: str) -> None:
    """A text file written whole under its name or not at all: readers see the old content or the new."""
    with write_into_place(path, folder=False) as staging:
        staging.write_text(text, encoding="utf-8")
