"""Checksums of downloaded files: sha256 (what the hub publishes for LFS files) and the git blob sha1 (for the
others), taken as the bytes are written (`HashingWriter`, in a thread of its own) or read back from disk, and
compared with what the hub published. A file that does not match is never given its final name.
"""
from __future__ import annotations

import hashlib
import queue
import threading
from pathlib import Path

from webui.hub.files import RemoteFile


def hashes(path: Path) -> tuple[str, str]:
    """(sha256, git blob sha1) in one pass; the hub publishes the first for LFS files, the second for all.
    (huggingface_hub.utils.sha has each, but its git_hash wants the whole file in memory and a second read.)"""
    h = Hasher(path.stat().st_size)
    h.update_from(path, None)
    return h.hexdigests()


def matches(sha256: str, sha1: str | None, size: int, f: RemoteFile) -> bool:
    """Whether the hashes and size of some bytes are what the hub published for `f`."""
    ok = sha256 == f.sha256 if f.sha256 else (f.blob_id is None or sha1 == f.blob_id)
    return ok and size == f.size


def verify(path: Path, f: RemoteFile) -> str | None:
    """The file's sha256 when it matches what the hub published, else None."""
    sha256, sha1 = hashes(path)
    return sha256 if matches(sha256, sha1, path.stat().st_size, f) else None


class Hasher:
    """sha256 and the git blob sha1 of a file of `size` bytes, fed piece by piece. (The blob header names
    the size up front: a file that ends up another size fails the size check anyway.) `sha1=False` skips
    the second: an LFS file is checked by its sha256 alone, and it is the big one."""

    def __init__(self, size: int, sha1: bool = True):
        self.size = size
        self.sha256, self.sha1 = hashlib.sha256(), hashlib.sha1(b"blob %d\0" % size) if sha1 else None

    def update(self, data) -> None:
        self.sha256.update(data)  # hashlib releases the GIL for large buffers: other transfers go on
        if self.sha1 is not None:
            self.sha1.update(data)

    def update_from(self, path: Path, length: int | None) -> None:
        """Feed the first `length` bytes of `path` (all of it for None)."""
        left = length
        with open(path, "rb") as fh:
            while left is None or left > 0:
                chunk = fh.read(1 << 20 if left is None else min(1 << 20, left))
                if not chunk:
                    break
                self.update(chunk)
                if left is not None:
                    left -= len(chunk)

    def hexdigests(self) -> tuple[str, str | None]:
        return self.sha256.hexdigest(), self.sha1.hexdigest() if self.sha1 is not None else None


class BackgroundHasher(Hasher):
    """The same digests, computed by a thread of its own while the transfer goes on: sha256 of 64 MB takes
    ~45 ms of one core here, a fifth of a download from a fast local hub when done in line with the writes
    (hashlib releases the GIL on large buffers, so the thread overlaps with receiving and writing). Chunks
    wait in a short queue; `hexdigests` waits for the last one; `close` ends the thread."""

    def __init__(self, size: int, sha1: bool = True):
        super().__init__(size, sha1)
        self._queue: queue.Queue = queue.Queue(maxsize=4)  # at most 4 chunks (40 MB of http_get's) held
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="download-hash", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (data := self._queue.get()) is not None:
            if self._error is None:
                try:
                    super().update(data)
                except BaseException as e:  # reported by hexdigests, in the downloading thread
                    self._error = e

    def update(self, data) -> None:
        self._queue.put(bytes(data))  # a copy unless it is bytes already: the caller may reuse its buffer

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def hexdigests(self) -> tuple[str, str | None]:
        self.close()
        if self._error is not None:
            raise self._error
        return super().hexdigests()


class HashingWriter:
    """The `.incomplete` file as `http_get` sees it: every chunk written is hashed on its way to disk, so the
    check after the transfer costs nothing and the file is never read back. A resumed file's existing part
    is hashed first. `http_get` rewinds (seek + truncate) when a server ignores `Range` and sends the whole
    file again; the hashes then restart from what is left on disk."""

    def __init__(self, fh, path: Path, f: RemoteFile):
        self.fh, self.path, self.size, self.sha1 = fh, path, f.size, not f.sha256
        self.written = fh.tell()  # "ab": positioned at the end of what an earlier run left
        self.hasher = BackgroundHasher(self.size, self.sha1)
        if self.written:
            self.hasher.update_from(path, self.written)

    def write(self, data) -> int:
        n = self.fh.write(data)
        self.hasher.update(data)
        self.written += len(data)
        return n

    def tell(self) -> int:
        return self.fh.tell()

    def seek(self, pos: int, whence: int = 0) -> int:
        return self.fh.seek(pos, whence)

    def truncate(self, size: int | None = None) -> int:
        n = self.fh.truncate(size)
        self.fh.flush()
        self.written = n
        self.hasher.close()
        self.hasher = BackgroundHasher(self.size, self.sha1)
        if n:
            self.hasher.update_from(self.path, n)
        return n

    def flush(self) -> None:
        self.fh.flush()

    def close(self) -> None:
        """Stop the hashing thread (a transfer that failed: its digests are not wanted)."""
        self.hasher.close()

    def digest_if_matches(self, f: RemoteFile) -> str | None:
        """The sha256 when what was written is the file the hub published, else None."""
        sha256, sha1 = self.hasher.hexdigests()
        return sha256 if matches(sha256, sha1, self.written, f) else None
