"""The run folder `runs/NAME/` of a training run, as the trainer (a child process) writes it and the runner
and the Training tab read it: `status.json` (state, step, max_steps, message, pid), `metrics.jsonl`,
`checkpoints/checkpoint-N/`, the `STOP` request file and the run's config. Light on purpose: reading a
run's progress imports no torch.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

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


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint that was written completely (a kill -9 can leave a partial one behind)."""
    done = []
    for c in (run_dir / "checkpoints").glob("checkpoint-*"):
        complete = (c / "trainer_state.json").is_file() and any(c.glob("adapter_model.*"))
        if complete and c.name.split("-")[-1].isdigit():
            done.append((int(c.name.split("-")[-1]), c))
    return max(done)[1] if done else None
