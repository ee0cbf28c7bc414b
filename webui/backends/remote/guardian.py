"""Runs a serving engine that LoRA Deck started and ends it when LoRA Deck ends, however it ends.

    python -m webui.backends.remote.guardian -- PROGRAM ARGS...

The engine runs in a session (process group) of its own, because vLLM starts processes of its own that must
go with it. An app that exits normally stops the engine itself; an app that is killed (SIGKILL, a crash) cannot,
and Linux's PR_SET_PDEATHSIG fires when the *thread* that started the child ends, which in a threaded server is
not the app's end. So this small parent watches its own parent: when the app is gone, or when it is told to
stop (SIGTERM), it ends the engine's whole group (SIGTERM, then SIGKILL after a grace period) and exits with the
engine's status.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

GRACE = 15.0  # seconds an engine gets to shut down before it is killed


def _end(proc: subprocess.Popen) -> int:
    for sig, wait in ((signal.SIGTERM, GRACE), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            return proc.wait(wait)
        except subprocess.TimeoutExpired:
            continue
    return proc.wait()


def main(argv: list[str]) -> int:
    if not argv or argv[0] != "--" or len(argv) < 2:
        print("usage: python -m webui.backends.remote.guardian -- PROGRAM ARGS...", file=sys.stderr)
        return 2
    parent = os.getppid()
    proc = subprocess.Popen(argv[1:], start_new_session=True)
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    signal.signal(signal.SIGINT, lambda *_: stopping.append(True))
    while True:
        code = proc.poll()
        if code is not None:
            return code
        if stopping or os.getppid() != parent:  # told to stop, or the app is gone (re-parented)
            return _end(proc)
        time.sleep(0.5)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
