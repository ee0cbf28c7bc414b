"""`pip install .` gives a working package: the wheel holds every module and the data files, and its
`loradeck` command is `python -m webui`, run from the installed copy (not the checkout)."""
from __future__ import annotations

import os
import subprocess
import sys
import zipfile

from tests.helpers import ROOT


def test_the_wheel_installs_a_working_loradeck_command(tmp_path):
    # --no-build-isolation: setuptools is in the venv already, so the test needs no network
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(ROOT)], check=True, cwd=tmp_path)
    wheel = next((tmp_path / "dist").glob("lora_deck-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {str(p.relative_to(ROOT)) for p in (ROOT / "webui").rglob("*") if p.is_file() and p.suffix in (".py", ".txt")}
    assert shipped <= names, sorted(shipped - names)

    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, cwd=tmp_path)
    env = {**os.environ, "PYTHONPATH": str(target)}  # ahead of the checkout's editable install
    where = subprocess.run([sys.executable, "-c", "import webui.backends.hf.gptq_quantize as q; print(q.__file__); "
                            "print(q.CALIBRATION.is_file())"], env=env, cwd=tmp_path, capture_output=True, text=True)
    shipped_quantizer = target / "webui" / "backends" / "hf" / "gptq_quantize.py"
    assert where.stdout.split() == [str(shipped_quantizer), "True"], where.stderr
    out = subprocess.run([str(target / "bin" / "loradeck"), "--help"], env=env, cwd=tmp_path, capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: loradeck")
    for command in ("serve", "download", "inspect", "train", "export", "eval", "blend", "publish", "loras",
                    "extract", "resize", "convert"):
        assert command in out.stdout.split("}")[0], (command, out.stdout)
    same = subprocess.run([sys.executable, "-m", "webui", "export", "--help"], env=env, cwd=tmp_path,
                          capture_output=True, text=True)
    assert "--format {safetensors,gguf,gptq,gguf-lora,ollama}" in same.stdout
