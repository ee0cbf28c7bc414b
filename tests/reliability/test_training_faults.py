"""Training under faults: a run SIGKILLed at random steps resumes from its last complete checkpoint and ends
with the adapter an uninterrupted run writes; after an app restart the runner never signals, nor reports as
running, a process that merely inherited the pid recorded in status.json."""
import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from safetensors.torch import load_file

from tests.helpers import write_data
from webui.options.training import TrainConfig
from webui.training.run_folder import latest_checkpoint, read_status, write_status
from webui.training.runner import TrainingRunner
from webui.training.trainer import train

STEPS, SAVE_EVERY = 24, 3


def _config(output: str, data: Path) -> TrainConfig:
    # lora_dropout 0 and a fixed seed: the run is deterministic, so a resumed run can be compared bit for bit
    return TrainConfig.from_dict({
        "base_model": "tiny-llama", "output": output, "dataset": {"path": str(data), "format": "raw"},
        "lora": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": "all-linear"},
        "training": {"max_steps": STEPS, "learning_rate": 0.002, "batch_size": 2, "save_steps": SAVE_EVERY,
                     "eval_steps": 6, "cutoff_len": 32, "seed": 7}})


def _wait(predicate, timeout=180, every=0.02):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(every)
    raise AssertionError("timed out")


@pytest.fixture
def dirs(tmp_path, tiny_models):
    return {"models": tiny_models["llama"].parent, "loras": tmp_path / "loras", "runs": tmp_path / "runs",
            "data": write_data(tmp_path / "data")["raw"]}


def test_sigkill_at_random_steps_resumes_to_the_uninterrupted_adapter(dirs):
    runner = TrainingRunner(dirs["runs"], dirs["models"], dirs["loras"])
    # the reference: the same run, never interrupted (in this process: one interpreter start less)
    train(_config("reference", dirs["data"]), dirs["models"], dirs["loras"], dirs["runs"], log=lambda *a: None)

    cfg, run = _config("killed", dirs["data"]), dirs["runs"] / "killed"
    kills = sorted(random.Random().sample(range(2, STEPS - 2), 2))  # random steps, a new draw every run
    resumed_from = []
    for target in kills:
        runner.start(cfg)
        # poll fast: a kill lands at whatever step (or mid-checkpoint) the trainer is in when it comes
        # (the trainer writes state running with its own step count; "starting" still shows the last run's step)
        _wait(lambda t=target: (read_status(run).get("state") == "running" and read_status(run).get("step", 0) >= t)
              or runner.view("killed").state not in ("starting", "running"))
        assert runner.view("killed").state == "running", runner.view("killed").log_tail
        before = latest_checkpoint(run)
        os.killpg(read_status(run)["pid"], signal.SIGKILL)
        _wait(lambda: runner.view("killed").state == "failed")
        assert not (dirs["loras"] / "killed").exists()  # no adapter before the run has finished
        resumed_from.append((before, latest_checkpoint(run)))
    runner.start(cfg)
    _wait(lambda: runner.view("killed").state in ("done", "failed"))
    assert runner.view("killed").state == "done", runner.view("killed").log_tail
    last = latest_checkpoint(run)
    assert read_status(run)["resumed_from"] == (resumed_from[-1][1].name if resumed_from[-1][1] else None)

    got = load_file(dirs["loras"] / "killed" / "adapter_model.safetensors")
    want = load_file(dirs["loras"] / "reference" / "adapter_model.safetensors")
    assert got.keys() == want.keys()
    # Same ops, same order, same CPU, optimizer and RNG state restored from the checkpoint: the resumed run is
    # the same computation, so the only allowance is float32 rounding of a reordered reduction (none seen here)
    for key in want:
        assert (got[key] - want[key]).abs().max() <= 1e-6, (key, kills, last)
    assert any((want[k] != 0).any() for k in want if "lora_B" in k)  # training moved the adapter at all


def test_a_checkpoint_torn_mid_write_is_not_resumed_from(tmp_path):
    """What a kill leaves mid-save: transformers writes trainer_state.json last, and in place, so a kill while it
    writes leaves a checkpoint with every weight file and a truncated state; resuming from it would fail."""
    for step, state in ((3, '{"global_step": 3, "log_history": []}'), (6, '{"global_step": 6, "log_hi')):
        c = tmp_path / "checkpoints" / f"checkpoint-{step}"
        c.mkdir(parents=True)
        (c / "adapter_model.safetensors").write_bytes(b"weights")
        (c / "trainer_state.json").write_text(state)
    assert latest_checkpoint(tmp_path).name == "checkpoint-3"


def _stranger():
    """A process that is not a trainer (`sleep`), as one that inherited a dead trainer's pid would be."""
    proc = subprocess.Popen(["sleep", "120"])
    _wait(lambda: psutil.pid_exists(proc.pid))
    return proc


@pytest.mark.parametrize("recorded", ["with_start_time", "pid_only"])
def test_runner_never_signals_a_pid_that_is_not_its_trainer(tmp_path, recorded):
    runs = tmp_path / "runs"
    run = runs / "orphan"
    run.mkdir(parents=True)
    (run / "requested.yaml").write_text("output: orphan\n")
    stranger = _stranger()
    try:
        # the app died while training; the trainer died too, and its pid now belongs to `sleep`
        fields = {"pid": stranger.pid}
        if recorded == "with_start_time":  # the trainer started before the stranger did
            fields["pid_started"] = psutil.Process(stranger.pid).create_time() - 30
        write_status(run, state="running", step=5, max_steps=10, **fields)
        runner = TrainingRunner(runs, tmp_path / "models", tmp_path / "loras")  # the restarted app's runner
        assert runner.view("orphan").state == "failed"
        assert runner.active() is None
        runner.stop("orphan", timeout=0.5)
        time.sleep(0.2)
        assert stranger.poll() is None, "the runner killed a process that was not its trainer"
        assert psutil.Process(stranger.pid).status() != psutil.STATUS_ZOMBIE
        assert json.loads((run / "status.json").read_text())["pid"] == stranger.pid
    finally:
        stranger.kill()
        stranger.wait()
