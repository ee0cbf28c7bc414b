"""Live checkpoints (issue 30): while a run trains, `RUN@step-N` and `RUN@latest` are adapters. Here: the names
and their folders, read from run folders written in the test (a running run is one whose status names this very
process); the Engine serving `RUN@latest` with the newest weights after each save by a hot-swap, its greedy
text equal to plain PEFT's with that checkpoint, and the base never reloaded; a run on another base reported
incompatible. The real app with a real training run is tests/test_live_checkpoints_app.py."""
import json
import os
import shutil

import pytest

from tests.helpers import PROMPT, peft_reference, reference_greedy, write_llama
from webui.engine import Engine
from webui.errors import BadInput, Incompatible, NotFound
from webui.options.config import GenerationParams, ModelSpec
from webui.testing.tiny_models import write_adapter
from webui.training.live import live_names, resolve_live
from webui.training.run_folder import pid_fields, write_status

GREEDY = GenerationParams(max_new_tokens=12, temperature=0.0)


def running_run(runs, name, base="tiny-llama"):
    run = runs / name
    run.mkdir(parents=True)
    write_status(run, state="running", step=0, max_steps=100, base=base, **pid_fields(os.getpid()))
    return run


def save_checkpoint(run, step, adapter, complete=True):
    """A checkpoint as transformers' Trainer leaves it: the adapter's files, trainer_state.json written last."""
    folder = run / "checkpoints" / f"checkpoint-{step}"
    shutil.copytree(adapter, folder)
    if complete:
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return folder


@pytest.fixture(scope="module")
def adapters(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("live-adapters")
    return {"A": write_adapter(tiny_models["llama"], root / "A", seed=1),
            "B": write_adapter(tiny_models["llama"], root / "B", seed=2),
            "other": write_adapter(write_llama(root / "wider-llama", hidden=96), root / "other", seed=3)}


def test_names_and_folders_of_a_running_run(tmp_path, adapters):
    runs, loras = tmp_path / "runs", tmp_path / "loras"
    run = running_run(runs, "r")
    assert live_names(runs) == []  # running, but nothing saved yet
    with pytest.raises(NotFound, match="no checkpoint yet"):
        resolve_live("r@latest", runs, loras)
    save_checkpoint(run, 5, adapters["A"])
    ten = save_checkpoint(run, 10, adapters["B"])
    save_checkpoint(run, 15, adapters["A"], complete=False)  # being written (or torn by a kill): not offered
    assert live_names(runs) == ["r@latest", "r@step-10", "r@step-5"]
    assert resolve_live("r@latest", runs, loras) == ten
    assert resolve_live("r@step-5", runs, loras) == run / "checkpoints" / "checkpoint-5"
    with pytest.raises(NotFound, match="step-5, step-10"):
        resolve_live("r@step-15", runs, loras)
    with pytest.raises(NotFound, match="no training run"):
        resolve_live("nope@latest", runs, loras)
    with pytest.raises(BadInput):
        resolve_live("..@latest", runs, loras)

    # finished: no longer live, and RUN@latest is the finished adapter in the adapters folder
    shutil.copytree(adapters["B"], loras / "r")
    write_status(run, state="done")
    assert live_names(runs) == []
    assert resolve_live("r@latest", runs, loras) == loras / "r"
    shutil.rmtree(loras / "r")  # stopped before the end: its last checkpoint
    assert resolve_live("r@latest", runs, loras) == ten


def test_a_stale_running_status_is_not_live(tmp_path, adapters):
    """status.json says running, but its process is gone (the app restarted after a crash): nothing is live."""
    runs = tmp_path / "runs"
    run = running_run(runs, "r")
    save_checkpoint(run, 5, adapters["A"])
    write_status(run, pid=os.getpid(), pid_started=1.0)  # another process that had this pid once
    assert live_names(runs) == []


def test_latest_follows_each_save_by_a_hot_swap(tmp_path, tiny_models, adapters):
    base = tiny_models["llama"]
    runs = tmp_path / "runs"
    engine = Engine(base.parent, tmp_path / "loras", runs)
    engine.load(ModelSpec(model=base.name, loader="transformers", dtype="float32"))
    loaded, model = engine.loaded, engine.current_backend().model
    run = running_run(runs, "r")
    save_checkpoint(run, 5, adapters["A"])
    assert "r@latest" in engine.adapter_choices() and "r@latest" not in engine.list_adapters()

    want_a = peft_reference(base, {"A": (adapters["A"], 1.0)}, PROMPT, 12)[0]
    want_b = peft_reference(base, {"B": (adapters["B"], 1.0)}, PROMPT, 12)[0]
    assert want_a != want_b
    engine.prepare_adapters(["r@latest"])
    assert engine.generate(PROMPT, GREEDY, adapters={"r@latest": 1.0}) == want_a
    engine.set_adapters({"r@latest": 1.0})  # picked in the UI: the Chat tab's stack
    assert engine.generate(PROMPT, GREEDY) == want_a

    save_checkpoint(run, 10, adapters["B"])
    engine.prepare_adapters(["r@latest"])  # what every API request naming it does first
    assert engine.generate(PROMPT, GREEDY, adapters={"r@latest": 1.0}) == want_b
    assert engine.generate(PROMPT, GREEDY) == want_b  # the UI's stack follows the save too
    engine.prepare_adapters(["r@step-5"])  # an older save, by its step
    assert engine.generate(PROMPT, GREEDY, adapters={"r@step-5": 1.0}) == want_a
    assert engine.generate(PROMPT, GREEDY, adapters={}) == reference_greedy(base, PROMPT, 12)
    assert engine.loaded is loaded and engine.current_backend().model is model  # never reloaded


def test_a_run_on_another_base_is_incompatible_with_the_reason(tmp_path, tiny_models, adapters):
    base = tiny_models["llama"]
    runs = tmp_path / "runs"
    engine = Engine(base.parent, tmp_path / "loras", runs)
    engine.load(ModelSpec(model=base.name, loader="transformers", dtype="float32"))
    save_checkpoint(running_run(runs, "m", base="wider-llama"), 5, adapters["other"])
    report = engine.adapter_report("m@latest", engine.adapter_path("m@latest"))
    assert report.verdict == "incompatible" and report.reasons
    with pytest.raises(Incompatible):
        engine.prepare_adapters(["m@latest"])
    assert engine.generate(PROMPT, GREEDY, adapters={}) == reference_greedy(base, PROMPT, 12)  # unharmed
