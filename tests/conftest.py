"""Shared fixtures: tiny models of every architecture (built once per test session, offline), a
reference greedy generation with plain transformers, and a helper to start the real app on a free
loopback port."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    from tests.tiny_models import write_all

    return write_all(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def models_dir(tiny_models) -> Path:
    return next(iter(tiny_models.values())).parent


@pytest.fixture(scope="session")
def embedded_folder(tmp_path_factory) -> Path:
    """The embedded SmolLM2 converted once for the whole session (as the app does on first start)."""
    from webui import embedded

    return embedded.ensure_transformers_folder(tmp_path_factory.mktemp("embedded-models"))


@pytest.fixture
def scratch_models(tmp_path, tiny_models) -> Path:
    """A models dir of our own (safe to break files in), holding a copy of tiny-llama."""
    d = tmp_path / "models"
    shutil.copytree(tiny_models["llama"], d / "tiny-llama")
    return d


def reference_greedy(path: Path, prompt: str, max_new_tokens: int) -> str:
    """Greedy continuation computed with plain transformers: the yardstick for our Engine."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    ids = tok(prompt, return_tensors="pt")
    out = model.generate(**ids, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AppProcess:
    """`python app.py ...` on a free loopback port; stopped when the test ends."""

    def __init__(self, *args: str, env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"lora-deck-app-{self.port}.log", "w+")
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--port", str(self.port), *args],
                                     cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})})

    def wait_ready(self, timeout: float = 180) -> "AppProcess":
        import urllib.request

        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"app exited with {self.proc.returncode}:\n{self.output()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.5)
        raise AssertionError(f"app not ready after {timeout} s:\n{self.output()}")

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


@pytest.fixture
def start_app():
    apps: list[AppProcess] = []

    def start(*args: str, env: dict | None = None, wait: bool = True) -> AppProcess:
        app = AppProcess(*args, env=env)
        apps.append(app)
        return app.wait_ready() if wait else app

    yield start
    for app in apps:
        app.stop()
