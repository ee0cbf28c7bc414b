"""Compatibility reports for a big library, computed in the background and kept on disk.

A report needs the adapter's tensors (the shape check), so computing one per adapter while drawing a list of
a hundred took the LoRA panel 12-19 s to appear. Here the list asks `ReportService.lookup`, which answers at
once with what is known (memory, then `loras/.cache/reports.json`) and queues the rest for one worker
thread; the panel shows "pending" and fills the badges in as reports arrive.

A cached report is keyed by the adapter's name and the loaded base (a digest of what the report is
checked against: the base's name and adaptable layers) and is valid only while the adapter's file signature
(webui.adapters.library.signature: sizes and mtimes of its config and weights) is unchanged, so editing,
replacing or re-training an adapter recomputes its report. The file is shared by every process using the
folder (two servers, the CLI): each write takes an exclusive lock, merges with what is on disk and replaces
the file atomically, so concurrent writers lose nothing and readers never see half a file.
"""
from __future__ import annotations

import fcntl
import json
import logging
import queue
import threading
from collections.abc import Callable
from pathlib import Path

from webui.adapters import library
from webui.atomic import write_text_into_place
from webui.errors import LoraDeckError, first_line

log = logging.getLogger(__name__)
CACHE_DIR = ".cache"
FILE = "reports.json"
VERSION = 1


def status_of(record: dict | None) -> str:
    """A cached record → the list's status: pending (none yet), compatible or incompatible."""
    if record is None:
        return "pending"
    if record.get("error") or (record.get("report") or {}).get("verdict") == "incompatible":
        return "incompatible"
    return "compatible"


class DiskCache:
    """loras/.cache/reports.json: {"version", "reports": {"NAME|BASEKEY": {"signature", "report" | "error"}}}."""

    def __init__(self, loras_dir: Path):
        self.dir = Path(loras_dir) / CACHE_DIR
        self.file = self.dir / FILE

    def read(self) -> dict:
        try:
            data = json.loads(self.file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}  # none yet, or damaged: recomputed and rewritten
        if not isinstance(data, dict) or data.get("version") != VERSION or not isinstance(data.get("reports"), dict):
            return {}
        return data["reports"]

    def write(self, records: dict, keep: Callable[[str], bool] = lambda key: True) -> None:
        """Merge `records` into the file under an exclusive lock; entries for which `keep(key)` is false
        (adapters no longer in the folder) are dropped so the file does not grow forever."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / (FILE + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            merged = {k: v for k, v in self.read().items() if keep(k)}
            merged.update(records)
            write_text_into_place(self.file, json.dumps({"version": VERSION, "reports": merged}))


class ReportService:
    """Background reports for one adapters folder. `compute(name)` returns a Report (raising LoraDeckError for
    an unreadable adapter) for the base loaded at that moment; `base_key()` names that base."""

    def __init__(self, loras_dir: Path, compute: Callable, base_key: Callable[[], str]):
        self.loras_dir = Path(loras_dir)
        self.disk = DiskCache(loras_dir)
        self._compute, self._base_key = compute, base_key
        self._memory: dict[str, dict] = {}   # "NAME|BASEKEY" -> record
        self._disk_mtime = None
        self._queued: set[str] = set()
        self._queue: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._worker: threading.Thread | None = None

    @staticmethod
    def key(name: str, base_key: str) -> str:
        return f"{name}|{base_key}"

    def _refresh_from_disk(self) -> None:
        """Pick up reports written by another process (or an earlier run) when the file changed."""
        try:
            mtime = self.disk.file.stat().st_mtime_ns
        except OSError:
            return
        if mtime != self._disk_mtime:
            self._disk_mtime = mtime
            for k, v in self.disk.read().items():
                self._memory.setdefault(k, v)

    def lookup(self, entries: list, queue_missing: bool = True) -> dict[str, dict | None]:
        """name -> the cached record ({"signature", "report": dict} or {"signature", "error": str}) valid for
        the adapter's current files and the loaded base, or None (pending: queued for the worker)."""
        base = self._base_key()
        out, missing = {}, []
        with self._lock:
            self._refresh_from_disk()
            for e in entries:
                rec = self._memory.get(self.key(e.name, base))
                if rec is not None and rec.get("signature") == e.signature:
                    out[e.name] = rec
                else:
                    out[e.name] = None
                    if e.name not in self._queued:
                        missing.append(e.name)
            if queue_missing:
                for name in missing:
                    self._queued.add(name)
                    self._queue.put(name)
                if missing and self._worker is None:
                    self._worker = threading.Thread(target=self._run, name="lora-reports", daemon=True)
                    self._worker.start()
        return out

    def statuses(self, entries: list) -> dict[str, str]:
        return {name: status_of(rec) for name, rec in self.lookup(entries).items()}

    def _run(self) -> None:
        pending: dict[str, dict] = {}
        while True:
            try:
                name = self._queue.get(timeout=30)
            except queue.Empty:
                with self._lock:  # under the lock, so a lookup queueing now sees no worker and starts one
                    if self._queue.empty():
                        self._worker = None
                        return
                continue
            try:
                rec = self._one(name)
                if rec is not None:
                    key, value = rec
                    with self._lock:
                        self._memory[key] = value
                    pending[key] = value
            except Exception:  # a bug in one report must not stop the others
                log.exception("compatibility report of %s failed", name)
            if pending and (self._queue.empty() or len(pending) >= 20):  # few writes, none left behind
                self._flush(pending)
                pending = {}
            with self._lock:
                self._queued.discard(name)

    def _one(self, name: str):
        base = self._base_key()
        try:
            entry = library.get(self.loras_dir, name)
        except LoraDeckError:
            return None  # renamed or deleted meanwhile
        try:
            record = {"signature": entry.signature, "report": self._compute(name).to_dict()}
        except LoraDeckError as e:
            record = {"signature": entry.signature, "error": str(e)}
        except Exception as e:  # noqa: BLE001  (an adapter that breaks a library is shown broken, with the reason)
            record = {"signature": entry.signature, "error": first_line(e)}
        if self._base_key() != base:
            return None  # the base changed while we computed: this report is for neither; redone on lookup
        try:
            if library.get(self.loras_dir, name).signature != entry.signature:
                return None  # the files changed while we read them
        except LoraDeckError:
            return None
        return self.key(name, base), record

    def _flush(self, records: dict) -> None:
        present = set(library.list_adapters(self.loras_dir))
        try:
            self.disk.write(records, keep=lambda key: key.rsplit("|", 1)[0] in present)
        except OSError as e:  # a read-only folder: reports stay in memory
            log.warning("could not write %s: %s", self.disk.file, e)

    def wait(self, timeout: float = 60.0) -> bool:
        """Block until the queue is empty and written (tests, the CLI). True when everything was computed."""
        import time

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                idle = not self._queued
            if idle and self._queue.empty():
                return True
            time.sleep(0.05)
        return False
