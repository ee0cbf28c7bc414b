"""The entry scripts as a user runs them: a broken --model fails fast with a one-line reason and a
non-zero exit; a non-loopback host without auth warns; download-model.py says it is not there yet."""
import subprocess
import sys

from tests.conftest import ROOT


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


def test_download_model_script_answers():
    r = run("download-model.py", "org/name")
    assert r.returncode != 0 and "not yet" in r.stderr
