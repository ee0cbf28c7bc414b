"""The entry scripts as a user runs them: a broken --model fails fast with a one-line reason and a
non-zero exit; a non-loopback host without auth warns; download-model.py is `python -m webui download`."""
import subprocess
import sys

import pytest

from tests.helpers import ROOT, free_port
from webui.testing.tiny_models import write_adapter


def run(*args, timeout=120):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_app_with_missing_model_exits_with_reason(tmp_path):
    r = run("app.py", "--model", "does-not-exist", "--models-dir", str(tmp_path))
    assert r.returncode == 1
    assert "model not found: does-not-exist" in r.stderr


def test_app_rejects_unknown_loader():
    r = run("app.py", "--loader", "exllama")
    assert r.returncode == 2 and "invalid choice" in r.stderr


def test_non_loopback_without_auth_warns(start_app, models_dir):
    app = start_app("--model", "tiny-llama", "--models-dir", str(models_dir), "--listen-host", "0.0.0.0")
    assert "without --auth or --api-key" in app.output()


def test_download_model_script_is_the_download_subcommand(tmp_path):
    import os

    for entry in (["download-model.py"], ["-m", "webui", "download"]):
        r = run(*entry, "--help")
        assert r.returncode == 0, r.stderr
        for flag in ("--branch", "--specific-file", "--exclude-pattern", "--threads", "--output", "--model-dir",
                     "--lora-dir", "--clean", "--check", "--max-retries", "--text-only"):
            assert flag in r.stdout
    # No hub to reach (a closed port; and offline mode): one line saying so, a non-zero exit, nothing written.
    for extra in ({"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}"}, {"HF_HUB_OFFLINE": "1"}):
        r = subprocess.run([sys.executable, "download-model.py", "org/name", "--model-dir", str(tmp_path)],
                           cwd=ROOT, capture_output=True, text=True, timeout=120, env={**os.environ, **extra})
        assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert r.stderr.startswith("error: ") and not any(tmp_path.iterdir())


def test_app_applies_loras_at_start(start_app, tiny_models, tmp_path):
    import json
    import urllib.request

    loras = tmp_path / "loras"
    write_adapter(tiny_models["llama"], loras / "A", target_modules=["q_proj"], r=2)
    write_adapter(tiny_models["llama"], loras / "B", target_modules=["v_proj"], r=8)
    app = start_app("--model", "tiny-llama", "--models-dir", str(tiny_models["llama"].parent),
                    "--loras-dir", str(loras), "--lora", "A", "B", "--lora-weights", "1", "0.5")
    with urllib.request.urlopen(app.url + "/health") as r:
        health = json.load(r)
    assert health["adapters"] == {"A": 1.0, "B": 0.5}

    r = run("app.py", "--model", "tiny-llama", "--models-dir", str(tiny_models["llama"].parent),
            "--loras-dir", str(loras), "--lora", "missing")
    assert r.returncode == 1 and "adapter not found: missing" in r.stderr
    r = run("app.py", "--lora", "A", "B", "--lora-weights", "1")
    assert r.returncode == 2 and "lora_weights" in r.stderr


EVAL = ["eval", "--dataset", "d.jsonl", "--format", "raw", "--out", "r.json"]


@pytest.mark.parametrize("argv, field, expected", [
    (["serve", "--lora", "A", "--lora", "B"], "lora", ["A", "B"]),
    (["serve", "--lora", "A", "B", "--lora-weights", "0.5", "--lora-weights", "2"], "lora_weights", [0.5, 2.0]),
    ([*EVAL, "--lora", "A", "--lora", "B"], "lora", ["A", "B"]),
    ([*EVAL, "--stack", "A=1,B=0.5", "--stack", "C=1"], "stack", ["A=1,B=0.5", "C=1"]),
    (["llama-server-command", "--model", "m.gguf", "--lora", "A", "--lora", "B"], "lora", ["A", "B"]),
])
def test_every_list_flag_accumulates(argv, field, expected):
    """A repeated list flag keeps every value (argparse's nargs alone keeps only the last, silently), and the
    default list is not shared between two parses."""
    from webui.cli import _parser

    parser = _parser()
    assert getattr(parser.parse_args(argv), field) == expected
    assert parser.parse_args(["serve"]).lora == []  # the default list was not appended to
