"""A serving engine process that LoRA Deck runs itself (the managed vllm and llama-server loaders): started on a
free loopback port through the guardian (webui/backends/remote/guardian.py, which ends it with the app), waited
for until it answers, watched, started again when it dies, and stopped with the model.

The engine's output goes to a log file (`$LORADECK_ENGINE_LOGS`, else `$TMPDIR/loradeck-engines/`, named
`<engine>-<app pid>.log`), and its last lines are in every error about the engine's start, because that is where
vLLM and llama-server say why they would not start.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from webui.errors import LoadFailed
from webui.progress import Progress, no_progress

RESTARTS = 3            # restarts within RESTART_WINDOW before the engine is left stopped
RESTART_WINDOW = 600.0  # seconds


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _children(pid: int) -> list[int]:
    try:
        import psutil

        return [c.pid for c in psutil.Process(pid).children()]
    except Exception:  # noqa: BLE001 - psutil missing or the process gone: the guardian's own stop is enough
        return []


def _kill_groups(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def tail(path: Path, lines: int = 12) -> str:
    try:
        text = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(text[-lines:])


class ManagedProcess:
    """One engine process. `command(port)` is its argument list for a port; it is ready when GET `ready_path`
    answers 200. `on_restart(url)` is called after the watcher started it again (the engine forgot what was
    registered at run time)."""

    def __init__(self, name: str, command: Callable[[int], list[str]], env: dict | None = None,
                 ready_path: str = "/health", log_dir: Path | None = None, start_timeout: float = 600.0):
        self.name, self.command, self.ready_path = name, command, ready_path
        self.env = {**os.environ, **(env or {})}
        log_dir = Path(log_dir) if log_dir else Path(tempfile.gettempdir()) / "loradeck-engines"
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"{name}-{os.getpid()}.log"
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.on_restart: Callable[[str], None] | None = None
        self.restarting = threading.Event()  # set while the watcher starts it again
        self._stopping = threading.Event()
        self._restarts: list[float] = []
        self._engines: list[int] = []  # the engine's pid (its process group) under the guardian, once ready
        self._watcher: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, progress: Progress = no_progress) -> str:
        """Start the engine and wait until it answers; its URL. LoadFailed with the log's last lines when it exits
        or does not answer within the time-out."""
        with self._lock:
            self._spawn()
            self._wait_ready(progress)
        if self._watcher is None:
            self._watcher = threading.Thread(target=self._watch, name=f"{self.name}-watcher", daemon=True)
            self._watcher.start()
        return self.url

    def _spawn(self) -> None:
        # a restart keeps the port, so the connection pool and every client keep their address
        self.port = self.port or free_port()
        args = self.command(self.port)
        log = open(self.log_path, "ab")
        log.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(args)}\n".encode())
        log.flush()
        try:
            self.proc = subprocess.Popen([sys.executable, "-m", "webui.backends.remote.guardian", "--", *args],
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         env=self.env)
        except OSError as e:
            raise LoadFailed(f"cannot start {self.name}: {e}") from None
        finally:
            log.close()

    def _wait_ready(self, progress: Progress) -> None:
        started, deadline = time.time(), time.time() + self.start_timeout
        with httpx.Client(timeout=5.0) as client:
            while time.time() < deadline:
                if self._stopping.is_set():  # unloaded while the watcher was starting it again
                    self._terminate()
                    raise LoadFailed(f"{self.name} was stopped while starting")
                if self.proc.poll() is not None:
                    raise LoadFailed(f"{self.name} exited with status {self.proc.returncode} while starting; "
                                     f"the end of its log ({self.log_path}):\n{tail(self.log_path)}")
                try:
                    if client.get(self.url + self.ready_path).status_code == 200:
                        self._engines = _children(self.proc.pid)
                        return
                except httpx.HTTPError:
                    pass
                waited = time.time() - started
                progress(min(0.9, 0.1 + waited / 120), f"starting {self.name} ({waited:.0f} s)")
                time.sleep(0.5)
        self._terminate()
        raise LoadFailed(f"{self.name} did not answer within {self.start_timeout:.0f} s; the end of its log "
                         f"({self.log_path}):\n{tail(self.log_path)}")

    def _watch(self) -> None:
        """Start the engine again when it dies (not when it is stopped), at most RESTARTS times in RESTART_WINDOW;
        requests in between fail with EngineUnavailable, as with any engine that went away."""
        while not self._stopping.wait(1.0):
            if self.proc is None or self.proc.poll() is None:
                continue
            now = time.time()
            self._restarts = [t for t in self._restarts if now - t < RESTART_WINDOW]
            if len(self._restarts) >= RESTARTS:
                continue  # left stopped: status() names the log
            with self._lock:
                if self._stopping.is_set() or self.proc.poll() is None:  # stopped, or restarted meanwhile
                    continue
                self._restarts.append(now)
                self.restarting.set()
                _kill_groups(self._engines)  # the guardian itself died: its engine would keep the port
                try:
                    self._spawn()
                    self._wait_ready(no_progress)
                except Exception:  # noqa: BLE001 - the next round tries again; the log says why
                    continue
                finally:
                    self.restarting.clear()
            if self.on_restart is not None:
                self.on_restart(self.url)

    def restart(self, progress: Progress = no_progress) -> None:
        """Stop the engine and start it again on the same port (a new command line: llama-server's adapters)."""
        with self._lock:
            self._terminate()
            self._spawn()
            self._wait_ready(progress)

    def status(self) -> str:
        """A line for errors and the Model tab: running, restarting, or stopped with the log's last line."""
        if self.running and not self.restarting.is_set():
            return f"{self.name} running (pid {self.proc.pid}, port {self.port})"
        if self.restarting.is_set():
            return f"{self.name} is being restarted (it exited)"
        last = tail(self.log_path, 1)
        return f"{self.name} stopped (status {self.proc.returncode if self.proc else '-'}); log {self.log_path}" + \
            (f": {last}" if last else "")

    def _terminate(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is not None:  # the guardian is gone; its engine may not be
            _kill_groups(self._engines)
            return
        engines = _children(self.proc.pid) or self._engines  # each leads the process group of an engine (see the guardian)
        self.proc.terminate()  # the guardian ends the engine's whole process group
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        _kill_groups(engines)  # a guardian that did not get to it: end the engine's group here

    def stop(self) -> None:
        self._stopping.set()
        with self._lock:
            self._terminate()
