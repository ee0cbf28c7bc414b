"""Live checkpoints in the real app (issue 30): a real training run (the runner's child process) writes to the
app's runs folder while the `openai` client asks the app for `RUN@latest`. Mid-run the checkpoint answers; after
later saves its answer changes; requests to the base keep getting the base's answer the whole time; the base is
loaded once (the app logs every load); and once the run is over `RUN@latest` answers exactly as `loras/RUN`."""
import threading
import time
from pathlib import Path

import openai

from tests.helpers import PROMPT, write_data
from webui.options.training import TrainConfig
from webui.training.run_folder import checkpoints
from webui.training.runner import TrainingRunner

SAVE_EVERY = 40


def _wait(predicate, what: str, timeout: float = 300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_running_run_serves_its_latest_checkpoint(tmp_path, tiny_models, start_app):
    models, loras, runs = tiny_models["llama"].parent, tmp_path / "loras", tmp_path / "runs"
    app = start_app("--model", "tiny-llama", "--models-dir", str(models), "--loras-dir", str(loras),
                    "--runs-dir", str(runs), "--nowebui")
    client = openai.OpenAI(base_url=app.url + "/v1", api_key="unused", max_retries=0, timeout=120)

    def ask(model: str):
        choice = client.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0,
                                           logprobs=1).choices[0]
        return choice.text, choice.logprobs.token_logprobs

    base = ask("tiny-llama")
    base_answers, errors, done = [], [], threading.Event()

    def base_traffic():  # another user of the app, on the base, all through the run
        while not done.is_set():
            try:
                base_answers.append(ask("tiny-llama"))
            except Exception as e:  # noqa: BLE001 (collected and asserted on below)
                errors.append(e)
            time.sleep(0.2)

    cfg = TrainConfig.from_dict({
        "base_model": "tiny-llama", "output": "live", "dataset": {"path": str(write_data(tmp_path / "data")["raw"]),
                                                                   "format": "raw"},
        "lora": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": "all-linear"},
        "training": {"max_steps": 1200, "learning_rate": 0.01, "batch_size": 2, "save_steps": SAVE_EVERY,
                     "cutoff_len": 32, "seed": 7}})
    runner = TrainingRunner(runs, models, loras)
    traffic = threading.Thread(target=base_traffic, daemon=True)
    traffic.start()
    try:
        runner.start(cfg)
        listed = _wait(lambda: {m.id: m for m in client.models.list().data}.get("live@latest"), "a first save")
        assert listed.parent == "tiny-llama" and Path(listed.root).parent == runs / "live" / "checkpoints"
        first = ask("live@latest")
        first_step = int(Path(listed.root).name.split("-")[-1])
        assert runner.view("live").state == "running", "the run ended before the test could ask it mid-run"
        assert first != base

        _wait(lambda: checkpoints(runs / "live")[-1][0] >= first_step + 3 * SAVE_EVERY, "later saves")
        assert runner.view("live").state == "running"
        later = ask("live@latest")
        assert later[1] != first[1]  # the newer weights: its log-probabilities moved

        _wait(lambda: runner.view("live").state in ("done", "failed"), "the end of the run")
        assert runner.view("live").state == "done", runner.view("live").log_tail
    finally:
        done.set()
        traffic.join(timeout=120)
        if runner.view("live").state in ("starting", "running", "stopping"):  # a failed test leaves no trainer
            runner.kill("live")
    assert "live@latest" not in [m.id for m in client.models.list().data]  # no longer a live run
    assert ask("live@latest") == ask("live")  # the finished adapter, exactly

    assert not errors, errors[:3]
    assert len(base_answers) >= 3 and all(answer == base for answer in base_answers)
    log = Path(app.log.name).read_text()
    assert log.count("loaded tiny-llama on") == 1, log  # hot-swaps only: the base was never reloaded

