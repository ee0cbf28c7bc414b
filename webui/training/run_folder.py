"""The run folder `runs/NAME/` of a training run, as the trainer (a child process) writes it and the runner
and the Training tab read it: `status.json` (state, step, max_steps, message, pid), `metrics.jsonl`,
`checkpoints/checkpoint-N/`, the `STOP` request file and the run's config. Light on purpose: reading a
run's progress imports no torch.

The pid in `status.json` outlives its process: after an app restart (or a reboot) the same number may belong to
any other program. So the trainer's pid is recorded with its start time (`pid_started`, psutil's create_time),
and `trainer_alive` only vouches for a process whose start time still matches — nothing is signalled or reported
running on the strength of a bare number.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import psutil

STATUS, METRICS, STOP, CONFIG = "status.json", "metrics.jsonl", "STOP", "config.yaml"


def read_status(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / STATUS).read_text())
    except (OSError, ValueError):
        return {}


def write_status(run_dir: Path, **fields) -> None:
    path = run_dir / STATUS
    current = read_status(run_dir)
    current.update(fields, updated=time.time())
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(current))
    tmp.replace(path)


def process_started(pid) -> float | None:
    """The start time of process `pid` (seconds since the epoch), None when there is no such process."""
    try:
        return psutil.Process(int(pid)).create_time()
    except (psutil.Error, ValueError, TypeError):
        return None


def pid_fields(pid: int) -> dict:
    """What status.json records of the trainer's process: its pid and that pid's start time."""
    return {"pid": pid, "pid_started": process_started(pid)}


def trainer_alive(status: dict) -> bool:
    """Whether the process status.json names is still the run's trainer: it exists, is not a zombie, and started
    when the run recorded (clock ticks are 1/100 s: a recycled pid starts later). A status without a start time
    (written by an older version) is trusted only when the process is a `webui train` command."""
    pid, started = status.get("pid"), status.get("pid_started")
    if not pid:
        return False
    try:
        proc = psutil.Process(int(pid))
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        if started is not None:
            return abs(proc.create_time() - float(started)) < 0.005
        cmdline = proc.cmdline()
        return "webui" in cmdline and "train" in cmdline
    except (psutil.Error, ValueError, TypeError):
        return False


def checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """The checkpoints that were written completely, as (step, folder) in step order. A kill -9 can leave a
    partial one behind: transformers writes the weights, optimizer and RNG state first and `trainer_state.json`
    last, but that file itself is written in place, so it must also parse and name the checkpoint's step."""
    done = []
    for c in (run_dir / "checkpoints").glob("checkpoint-*"):
        step = c.name.split("-")[-1]
        if not (step.isdigit() and any(c.glob("adapter_model.*"))):
            continue
        try:
            complete = json.loads((c / "trainer_state.json").read_text()).get("global_step") == int(step)
        except (OSError, ValueError, AttributeError):
            complete = False
        if complete:
            done.append((int(step), c))
    return sorted(done)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint that was written completely (see `checkpoints`)."""
    done = checkpoints(run_dir)
    return done[-1][1] if done else None
