"""Live checkpoints: while a training run NAME is running, each checkpoint it has saved is an adapter named
`NAME@step-N`, and `NAME@latest` is the newest one, so a user can chat with, compare and evaluate the adapter
as it trains. The names resolve to the checkpoint folders in the run folder (`runs/NAME/checkpoints/`), which
hold a PEFT adapter each. After the run, `NAME@latest` is the finished adapter `loras/NAME`.

The Engine resolves these names (the one door for adapter paths); its cache is keyed by the files' signature,
so a request for `NAME@latest` after a newer save loads the newer weights by a hot-swap, never a base reload.
"""
from __future__ import annotations

import re
from pathlib import Path

from webui.adapters.files import check_adapter_name, list_adapters
from webui.errors import NotFound
from webui.paths import inside
from webui.training.run_folder import checkpoints, read_status, trainer_alive

LIVE = re.compile(r"^(?P<run>[^@]+)@(?:(?P<latest>latest)|step-(?P<step>\d+))$")
RUNNING = ("starting", "running", "stopping")


def is_live(name: str) -> bool:
    return bool(LIVE.match(name or ""))


def running(run_dir: Path) -> bool:
    """Is this run's trainer at work now (its recorded process still alive, not a recycled pid)?"""
    status = read_status(run_dir)
    return status.get("state") in RUNNING and trainer_alive(status)


def live_names(runs_dir: Path) -> list[str]:
    """`NAME@latest` and `NAME@step-N` (newest first) for each running run that has saved a checkpoint."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        return []
    out = []
    for run in sorted((p for p in runs_dir.iterdir() if p.is_dir()), key=lambda p: p.name.lower()):
        if not running(run):
            continue
        steps = [step for step, _ in checkpoints(run)]
        if steps:
            out += [f"{run.name}@latest", *(f"{run.name}@step-{s}" for s in reversed(steps))]
    return out


def resolve_live(name: str, runs_dir: Path, loras_dir: Path) -> Path:
    """A live checkpoint's folder. `NAME@step-N`: that checkpoint while it exists (a run keeps its last few).
    `NAME@latest`: the newest checkpoint while the run trains; afterwards the finished adapter in the adapters
    folder, or, for a run stopped before it finished, its last checkpoint."""
    m = LIVE.match(name or "")
    if not m:
        raise NotFound(f"{name!r} is not a live checkpoint name (RUN@latest or RUN@step-N)", param="model")
    run_name = m["run"]
    check_adapter_name(run_name, runs_dir)  # a plain folder name: nothing outside the runs folder
    run = Path(runs_dir) / run_name
    if not run.is_dir() or not inside(runs_dir, run):
        raise NotFound(f"{name}: there is no training run {run_name!r} in {runs_dir}", param="model")
    saved = dict(checkpoints(run))
    if m["step"] is not None:
        step = int(m["step"])
        if step not in saved:
            have = ", ".join(f"step-{s}" for s in sorted(saved)) or "none yet"
            raise NotFound(f"{name}: run {run_name} has no checkpoint at step {step} (it keeps its last few: "
                           f"{have})", param="model")
        return saved[step]
    if not running(run) and run_name in list_adapters(loras_dir):
        return Path(loras_dir) / run_name
    if not saved:
        raise NotFound(f"{name}: run {run_name} has saved no checkpoint yet (one every save_steps steps)",
                       param="model")
    return saved[max(saved)]
