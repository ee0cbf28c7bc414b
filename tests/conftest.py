"""Shared fixtures: tiny models of every architecture, a GGUF of the tiny Llama and a 4-bit GPTQ Llama with
their adapters (each built once per test session, offline), the real app on a free loopback port, and a
headless Chromium. Helper functions and constants live in tests/helpers.py."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.helpers import GPTQ_GROUP, AppProcess, free_port, write_llama

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


# -- the long soak: tests marked `soak` run only with --soak (./run-tests.sh --soak) -------------------
def pytest_addoption(parser):
    parser.addoption("--soak", action="store_true", help="also run the long soak tests (marked soak)")


def pytest_configure(config):
    config.addinivalue_line("markers", "soak: a long soak test, run only with --soak")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--soak"):
        return
    skip = pytest.mark.skip(reason="long soak: run with --soak")
    for item in items:
        if "soak" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    from webui.testing.tiny_models import write_all

    return write_all(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def models_dir(tiny_models) -> Path:
    return next(iter(tiny_models.values())).parent


@pytest.fixture(scope="session")
def embedded_folder(tmp_path_factory) -> Path:
    """The embedded SmolLM2 converted once for the whole session (as the app does on first start)."""
    from webui.backends import embedded

    return embedded.ensure_transformers_folder(tmp_path_factory.mktemp("embedded-models"))


@pytest.fixture
def scratch_models(tmp_path, tiny_models) -> Path:
    """A models dir of our own (safe to break files in), holding a copy of tiny-llama."""
    d = tmp_path / "models"
    shutil.copytree(tiny_models["llama"], d / "tiny-llama")
    return d


@pytest.fixture(scope="session")
def gguf_models(tiny_models, tmp_path_factory) -> Path:
    """A models dir holding tiny-llama.gguf (f32, written by the converter the export uses) and the tiny-llama
    transformers folder it came from."""
    from webui.export.hf_to_gguf import hf_to_gguf

    d = tmp_path_factory.mktemp("gguf-models")
    shutil.copytree(tiny_models["llama"], d / "tiny-llama")
    hf_to_gguf(d / "tiny-llama", d / "tiny-llama.gguf")
    return d


@pytest.fixture(scope="session")
def llama_loras(gguf_models, tmp_path_factory) -> Path:
    """Adapters for tiny-llama: A (r=4, attention), B (r=8, all-linear, another rank) and `other`, written for
    a Llama twice as wide (it cannot fit)."""
    from webui.testing.tiny_models import write_adapter

    d = tmp_path_factory.mktemp("llama-loras")
    base = gguf_models / "tiny-llama"
    # q/k included on purpose: on llama.cpp their B rows must follow its q/k permutation
    write_adapter(base, d / "A", target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], r=4, alpha=8, seed=1)
    write_adapter(base, d / "B", target_modules="all-linear", r=8, alpha=16, seed=2)
    wide = write_llama(tmp_path_factory.mktemp("wide") / "wide-llama", 64, seed=3)
    write_adapter(wide, d / "other", target_modules=["q_proj", "v_proj"], r=4, alpha=8, seed=4)
    return d


@pytest.fixture(scope="session")
def gptq_dirs(tmp_path_factory):
    """models/{tiny-float, tiny-gptq (4-bit, group 32, quantized with the project's calibration text),
    other-float} and loras/{A, B, other} shared by the whole session."""
    from webui.backends.hf.gptq_quantize import quantize_folder
    from webui.testing.tiny_models import write_adapter

    root = tmp_path_factory.mktemp("gptq")
    models, loras = root / "models", root / "loras"
    base = write_llama(models / "tiny-float", 128)
    quantize_folder(base, models / "tiny-gptq", bits=4, group_size=GPTQ_GROUP)
    other = write_llama(models / "other-float", 64, seed=3)
    # write_adapter's LoRA weights have a 0.5 spread; a small alpha makes each weight change about as large as
    # the base's own weights (a strong but realistic adapter; a far larger one would be most of the model)
    write_adapter(base, loras / "A", target_modules=["q_proj", "v_proj"], r=4, alpha=0.25, seed=1)
    write_adapter(base, loras / "B", target_modules="all-linear", r=8, alpha=0.25, seed=2)
    write_adapter(other, loras / "other", target_modules=["q_proj", "v_proj"], r=4, alpha=0.25, seed=4)
    return models, loras


@pytest.fixture(scope="session")
def bnb_dirs(tmp_path_factory):
    """models/{tiny-float (a 128-wide Llama: bitsandbytes' CPU 4-bit kernel works in blocks of 64 inputs, so the
    32-wide tiny models cannot be quantized), other-float} and loras/{A, B, other} for the bitsandbytes tests."""
    from webui.testing.tiny_models import write_adapter

    root = tmp_path_factory.mktemp("bnb")
    models, loras = root / "models", root / "loras"
    base = write_llama(models / "tiny-float", 128)
    other = write_llama(models / "other-float", 64, seed=3)
    # small alpha: each weight change about as large as the base's own weights (see gptq_dirs)
    write_adapter(base, loras / "A", target_modules=["q_proj", "v_proj"], r=4, alpha=0.25, seed=1)
    write_adapter(base, loras / "B", target_modules="all-linear", r=8, alpha=0.25, seed=2)
    write_adapter(other, loras / "other", target_modules=["q_proj", "v_proj"], r=4, alpha=0.25, seed=4)
    return models, loras


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


@pytest.fixture(scope="module")
def browser():
    """Debian's Chromium driven by Playwright (no browser download)."""
    from tests.browser import ARGS

    pw = pytest.importorskip("playwright.sync_api")
    with pw.sync_playwright() as p:
        b = p.chromium.launch(executable_path="/usr/bin/chromium", args=ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def s3_server():
    """A local S3 (moto's server) on a loopback port: its endpoint URL."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()
