"""Training jobs as child processes, for the UI: start `python -m webui train --config runs/NAME/config.yaml`
with its output in `runs/NAME/log.txt`, ask it to stop (a STOP file: it saves a checkpoint first, and is
killed if it does not stop in time), and read any run's state back from its folder — so a reloaded page,
or a restarted app, re-attaches to runs that are still going.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from webui.adapters.files import check_adapter_name
from webui.errors import BadInput
from webui.options.training import TrainConfig
from webui.training import preference
from webui.training.data import check_files
from webui.training.run_folder import (
    CONFIG,
    METRICS,
    STOP,
    latest_checkpoint,
    pid_fields,
    process_started,
    read_status,
    trainer_alive,
    write_status,
)

ROOT = Path(__file__).resolve().parents[2]
LOG = "log.txt"


def pid_alive(pid) -> bool:
    """Whether process `pid` runs (not a zombie). For a run's trainer use `alive(status)`, which also checks that
    the pid still belongs to it."""
    return trainer_alive({"pid": pid, "pid_started": process_started(pid)})


def alive(status: dict) -> bool:
    """Whether the trainer status.json names still runs; reaps it when it is our own finished child (a zombie
    until then), so that a later check does not see it running."""
    pid = status.get("pid")
    if trainer_alive(status):
        return True
    if pid and status.get("pid_started") is not None and process_started(pid) == status["pid_started"]:
        try:  # the same process, now a zombie: ours to reap (waitpid refuses anyone else's child)
            os.waitpid(int(pid), os.WNOHANG)
        except ChildProcessError:
            pass
    return False


def _kill_group(status: dict) -> None:
    """SIGKILL the run and everything it started (a multi-process run's launcher and ranks): the run is a
    session leader (start_new_session), so its process group has its pid. Only a process that is still the
    run's trainer (same pid and start time: after an app restart the pid may be another program's)."""
    if not trainer_alive(status):
        return
    pid = int(status["pid"])
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGKILL)


@dataclass
class RunView:
    name: str
    state: str                 # running | stopping | stopped | done | failed | unknown
    step: int = 0
    max_steps: int = 0
    message: str = ""
    metrics: list = field(default_factory=list)
    log_tail: str = ""

    @property
    def eta_s(self) -> float | None:
        steps = [m for m in self.metrics if "loss" in m]
        if len(steps) < 2 or not self.max_steps or self.state != "running":
            return None
        rate = (steps[-1]["step"] - steps[0]["step"]) / max(steps[-1]["time"] - steps[0]["time"], 1e-6)
        return (self.max_steps - self.step) / rate if rate > 0 else None


class TrainingRunner:
    def __init__(self, runs_dir: Path, models_dir: Path, loras_dir: Path):
        self.runs_dir, self.models_dir, self.loras_dir = Path(runs_dir), Path(models_dir), Path(loras_dir)

    def start(self, cfg: TrainConfig) -> Path:
        check_adapter_name(cfg.output, self.loras_dir)  # the run folder must stay inside runs/
        # bad data is refused here, not 45 s into a run (relative paths as the run's process, started in ROOT, reads them)
        paths = [p if Path(p).is_absolute() else ROOT / p for p in cfg.dataset.paths]
        if cfg.dataset.format == "preference":
            preference.check_files(paths)
        else:
            check_files(paths, cfg.dataset.format)
        run = self.runs_dir / cfg.output
        view = self.view(cfg.output)
        if view.state in ("starting", "running", "stopping"):
            raise BadInput(f"{cfg.output} is already training")
        run.mkdir(parents=True, exist_ok=True)
        config_file = run / "requested.yaml"
        config_file.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        (run / STOP).unlink(missing_ok=True)
        write_status(run, state="starting", message="starting…")
        log = open(run / LOG, "a")
        env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        proc = subprocess.Popen(
            [sys.executable, "-m", "webui", "train", "--config", str(config_file), "--models-dir",
             str(self.models_dir), "--loras-dir", str(self.loras_dir), "--runs-dir", str(self.runs_dir)],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        log.close()
        write_status(run, **pid_fields(proc.pid))
        return run

    def stop(self, name: str, timeout: float | None = None) -> bool:
        """Ask the run to stop: it saves a checkpoint at the end of the step it is in, however long that step
        takes, and records "checkpoint saved" itself once it has. Waits up to `timeout` seconds (None: until it
        has stopped; 0: not at all) and returns whether it has. It is never killed here: a run killed mid-step
        saves nothing, and a stop that reported a checkpoint it had not written misled users (see kill)."""
        run = self.runs_dir / name
        status = read_status(run)
        if not alive(status):
            return True
        (run / STOP).touch()
        write_status(run, state="stopping", message="stopping: a checkpoint is saved at the end of the current step…")
        deadline = None if timeout is None else time.time() + timeout
        while alive(status) and (deadline is None or time.time() < deadline):
            time.sleep(0.2)
        return not alive(status)

    def kill(self, name: str) -> None:
        """Kill the run at once (its process group): no checkpoint is saved; a later start resumes from the last
        one the run saved on its own (every save_steps), which the message names."""
        run = self.runs_dir / name
        status = read_status(run)
        if alive(status):
            _kill_group(status)
            last = latest_checkpoint(run)
            write_status(run, state="stopped", message="killed without saving; start again to resume from "
                         + (last.name if last else "the start (no checkpoint was saved)"))

    def view(self, name: str) -> RunView:
        run = self.runs_dir / name
        status = read_status(run)
        state = status.get("state", "unknown")
        if state in ("starting", "running", "stopping") and not alive(status):
            state = "failed" if state != "stopping" else "stopped"
            if state == "failed" and not status.get("message", "").startswith("error"):
                status["message"] = self._last_error(run) or "the training process ended unexpectedly"
        return RunView(name=name, state=state, step=status.get("step", 0), max_steps=status.get("max_steps", 0),
                       message=status.get("message", ""), metrics=self.metrics(name), log_tail=self.log_tail(name))

    def metrics(self, name: str) -> list[dict]:
        path = self.runs_dir / name / METRICS
        if not path.is_file():
            return []
        rows = []
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue  # a line being written right now
        return rows

    def log_tail(self, name: str, lines: int = 40) -> str:
        path = self.runs_dir / name / LOG
        if not path.is_file():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def _last_error(self, run: Path) -> str:
        for line in reversed(self.log_tail(run.name, 200).splitlines()):
            if line.startswith("error:") or "Error" in line:
                return line.strip()
        return ""

    def runs(self) -> list[str]:
        if not self.runs_dir.is_dir():
            return []
        found = [p for p in self.runs_dir.iterdir() if (p / CONFIG).is_file() or (p / "requested.yaml").is_file()]
        return [p.name for p in sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)]

    def active(self) -> str | None:
        """The run that is going on now, if any (what a reloaded page re-attaches to)."""
        for name in self.runs():
            if self.view(name).state in ("starting", "running", "stopping"):
                return name
        return None
