"""The managed llama-server loader (`--loader llama-server`): LoRA Deck starts llama.cpp's llama-server on a GGUF
itself, restarts it with each adapter it was not started with (converted to a GGUF LoRA), starts it again when
it dies, and ends it with the model or the app. Every answer through the Engine (as the UI drives it) is
compared with a plain llama-server the test starts itself on the same GGUF with the same GGUF LoRAs. Skipped
when llama-server is not built (bash scripts/build-llama-server.sh)."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from tests.helpers import AppProcess, converted_lora, free_port, streamed_chat, wait_healthy, write_llama
from webui.backends.remote.managed import cached_program
from webui.engine import Engine
from webui.errors import LoraDeckError
from webui.options.config import GenerationParams, ModelSpec

MAX = 12
QUESTION = [{"role": "user", "content": "Name three colors."}]
# one thread and no prompt cache on both servers: llama-server then repeats a greedy answer exactly
SPEC = {"model": "llama256.gguf", "loader": "llama-server", "n_threads": 1, "engine_args": "--no-cache-prompt"}
# lora scales of A and B (the ids the plain server gives them: the order of its --lora list)
SCALES = {"base": [0.0, 0.0], "A": [1.0, 0.0], "B": [0.0, 1.0], "stack": [0.7, 0.5]}
STACKS = {"base": {}, "A": {"A": 1.0}, "B": {"B": 1.0}, "stack": {"A": 0.7, "B": 0.5}}


@pytest.fixture(scope="module")
def binary() -> str:
    found = cached_program("build-llama-server.sh")
    if not found:
        pytest.skip("llama-server is not built (bash scripts/build-llama-server.sh builds it, about 10 minutes)")
    return found


@pytest.fixture(scope="module")
def world(binary, tmp_path_factory):
    """models/{llama256 (a 256-wide Llama), llama256.gguf} and loras/{A (q/k/v/o, r=4), B (all-linear, r=8)}."""
    from webui.export.hf_to_gguf import hf_to_gguf
    from webui.testing.tiny_models import write_adapter

    root = tmp_path_factory.mktemp("managed-llama-server")
    models, loras = root / "models", root / "loras"
    base = write_llama(models / "llama256", 256)
    write_adapter(base, loras / "A", target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], r=4, alpha=8, seed=1)
    write_adapter(base, loras / "B", target_modules="all-linear", r=8, alpha=16, seed=2)
    hf_to_gguf(base, models / "llama256.gguf")
    return models, loras


class PlainServer:
    """llama-server as a user starts it, on the GGUF with GGUF LoRA files (ids in their order, all at scale 0)."""

    def __init__(self, binary: str, gguf: Path, loras: list[Path]):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = [binary, "-m", str(gguf), "--host", "127.0.0.1", "--port", str(self.port), "--lora",
                ",".join(map(str, loras)), "--lora-init-without-apply", "-t", "1", "--no-cache-prompt",
                "--no-webui"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     env={**os.environ, "LD_LIBRARY_PATH": str(Path(binary).parent)})
        wait_healthy(self.proc, self.url, "llama-server")

    def chat(self, name: str) -> str:
        """The streamed reply of its chat route, as LoRA Deck asks it (the tiny model's invalid UTF-8 is replaced
        over the whole reply there)."""
        return streamed_chat(self.url, {"messages": QUESTION, "temperature": 0, "max_tokens": MAX,
                                        "lora": [{"id": i, "scale": s} for i, s in enumerate(SCALES[name])]})

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(30)


def engine_processes(guardian_pid: int) -> list[psutil.Process]:
    """The guardian and everything under it (the engine)."""
    guardian = psutil.Process(guardian_pid)
    return [guardian, *guardian.children(recursive=True)]


def servers_under(guardian_pid: int) -> list[psutil.Process]:
    return [p for p in engine_processes(guardian_pid) if Path(p.exe()).name == "llama-server"]


def all_gone(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Those of `procs` still alive after `timeout` seconds (zombies count as gone)."""
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    return [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def ask(engine: Engine) -> str:
    return "".join(engine.stream_chat(QUESTION, GenerationParams(temperature=0, max_new_tokens=MAX)))


def test_adapters_restarts_and_unload(world, binary):
    models, loras = world
    engine = Engine(models, loras)
    engine.load(ModelSpec(**SPEC))
    backend = engine.current_backend()
    try:
        guardian = backend.process.proc.pid
        [first] = servers_under(guardian)
        assert "--lora" not in first.cmdline()  # started with no adapter
        got = {"base": ask(engine)}

        # each adapter it was not started with: converted, and the server started again with it
        started_with = []
        for name in ("A", "B"):
            engine.set_adapters({name: 1.0})
            [server] = servers_under(backend.process.proc.pid)
            assert not first.is_running() or first.status() == psutil.STATUS_ZOMBIE
            started_with.append(str(converted_lora(loras, name)))
            args = server.cmdline()
            assert args[args.index("--lora") + 1] == ",".join(started_with), args
            first = server
            got[name] = ask(engine)
        engine.set_adapters(STACKS["stack"])  # both loaded: no restart
        assert servers_under(backend.process.proc.pid) == [first]
        got["stack"] = ask(engine)

        # the same GGUF and GGUF LoRA files in a llama-server of our own
        plain = PlainServer(binary, models / "llama256.gguf", [converted_lora(loras, n) for n in ("A", "B")])
        try:
            want = {name: plain.chat(name) for name in SCALES}
        finally:
            plain.stop()
        assert len(set(want.values())) == 4, want  # each adapter changes the answer
        assert got == want

        # the engine dies: the watcher starts it again with the same adapters, and the next request is answered
        engine.set_adapters({"A": 1.0})
        args = first.cmdline()
        os.kill(first.pid, signal.SIGKILL)
        deadline, answer, errors = time.time() + 60, None, []
        while time.time() < deadline and answer != want["A"]:
            try:
                answer = ask(engine)
            except LoraDeckError as e:  # while it is down and starting: EngineUnavailable
                errors.append(str(e))
                time.sleep(1)
        assert answer == want["A"], (answer, errors[-3:], engine.engine_status())
        [again] = servers_under(backend.process.proc.pid)
        assert again.pid != first.pid and again.cmdline() == args
        # the status says so once the watcher is done (it may still be polling /health when a request gets in)
        deadline = time.time() + 10
        while "running" not in engine.engine_status()["process"] and time.time() < deadline:
            time.sleep(0.2)
        assert engine.engine_status()["process"] == f"llama-server running (pid {backend.process.proc.pid}, port " \
            f"{backend.process.port})"
        engine.set_adapters(STACKS["B"])
        assert ask(engine) == want["B"]
        procs = engine_processes(backend.process.proc.pid)
    finally:
        engine.unload()
    # unloading ends the guardian and the server
    assert all_gone(procs, 30) == []


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["stopped", "killed"])
def test_the_engine_ends_with_the_app(world, sig):
    """The app stopped (SIGTERM) or killed (SIGKILL: it cannot clean up): its guardian ends the llama-server."""
    models, loras = world
    app = AppProcess("--loader", "llama-server", "--model", "llama256.gguf", "--models-dir", str(models),
                     "--loras-dir", str(loras), "--nowebui").wait_ready()
    try:
        procs = psutil.Process(app.proc.pid).children(recursive=True)
        assert any(Path(p.exe()).name == "llama-server" for p in procs), procs
        app.proc.send_signal(sig)
        app.proc.wait(30)
        left = all_gone(procs, 30)
        assert left == [], [p.cmdline() for p in left]
    finally:
        app.stop()
