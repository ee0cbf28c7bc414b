"""Several training processes through Accelerate: `train --num-processes N` (or `training.num_processes`) and
`train --accelerate-config FILE` re-run the same `python -m webui train` command under `accelerate launch`, so
each process runs the ordinary trainer and transformers' Trainer does the DDP (or, with a config file, FSDP,
DeepSpeed or multi-node: whatever the file says; we pass it through unchanged).

On a machine without CUDA, `accelerate launch --cpu` would start one process only; `--multi_gpu` starts the
N processes through torchrun, and the Trainer, running with use_cpu, joins them with gloo (MULTI_CPU).
The processes split the cores between them.
"""
from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from webui.errors import BadInput


def in_launched_process() -> bool:
    """True inside a process that a launcher (accelerate launch, torchrun) started."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def die_with_launcher() -> None:
    """In a rank: be killed when the launcher dies. torchrun starts each rank in a session of its own, so a
    kill -9 of the run's process group (the UI's stop, a user's kill) would leave the ranks training on as
    orphans, next to the run that resumes. Linux's PR_SET_PDEATHSIG closes that gap; elsewhere it is a no-op."""
    if not in_launched_process() or not sys.platform.startswith("linux"):
        return
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() == 1:  # the launcher died before the line above
        os._exit(1)


def wanted(num_processes: int, accelerate_config: str | None) -> bool:
    return not in_launched_process() and (num_processes > 1 or bool(accelerate_config))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cuda_devices() -> int:
    import torch  # only here: the launcher itself needs no torch otherwise

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def launch_command(train_args: list[str], num_processes: int, accelerate_config: str | None) -> list[str]:
    """The `accelerate launch` command line that runs `python -m webui train <train_args>` in each process."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if accelerate_config:
        config = Path(accelerate_config)
        if not config.is_file():
            raise BadInput(f"--accelerate-config {accelerate_config}: no such file")
        cmd += ["--config_file", str(config)]
        if num_processes > 1:
            cmd += ["--num_processes", str(num_processes)]
    else:
        gpus = _cuda_devices()
        if gpus and num_processes > gpus:
            raise BadInput(f"num_processes {num_processes}: this machine has {gpus} GPU(s); use at most {gpus}, "
                           "or an --accelerate-config for several machines")
        threads = max(1, (os.cpu_count() or 1) // num_processes)
        cmd += ["--multi_gpu", "--num_processes", str(num_processes), "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
                "--num_cpu_threads_per_process", str(threads)]
    return cmd + ["-m", "webui", "train", *train_args]


def run(train_args: list[str], num_processes: int, accelerate_config: str | None) -> int:
    """Run the launcher in this process group (a kill of the group stops every rank); its exit status."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH", "")])}
    return subprocess.call(launch_command(train_args, num_processes, accelerate_config), env=env)
