"""Exports (safetensors, gguf, gptq) and blends SIGKILLed while they write: nothing ever appears under the final
name half-written, and the next run succeeds (gguf and gptq run with --soak, for time). Each CLI run is watched
until its weights file is open for writing inside the hidden work folder the writer uses, and killed then."""
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import GPTQ_GROUP, ROOT, write_llama
from webui.testing.tiny_models import write_adapter

CLI = [sys.executable, "-m", "webui"]


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """models/wide (a 2-layer Llama 512 wide, ~20 MB: big enough that writing it takes some milliseconds to catch)
    and loras/{A, B} (r=384, all-linear: their cat blend, rank 768, is ~50 MB) for it."""
    root = tmp_path_factory.mktemp("wide")
    base = write_llama(root / "models" / "wide", 512)
    for name, seed in (("A", 1), ("B", 2)):
        write_adapter(base, root / "loras" / name, target_modules="all-linear", r=384, alpha=16, seed=seed)
    return root / "models", root / "loras"


WEIGHTS = (".safetensors", ".gguf")  # the files worth catching half-written: the weights


def _being_written(watch: Path, suffixes: tuple = WEIGHTS) -> Path | None:
    """A weights file inside a hidden (temporary) folder (or a hidden file) under `watch`: being written, or written
    and waiting, with the rest of its folder, for the rename that gives it its final name."""
    if not watch.is_dir():
        return None
    for entry in os.scandir(watch):
        if not entry.name.startswith("."):
            continue
        paths = [Path(entry.path)] if entry.is_file() else [
            Path(folder) / f for folder, _, files in os.walk(entry.path) for f in files]
        for p in paths:
            try:
                if p.name.endswith(suffixes) and p.exists():
                    return p
            except OSError:  # renamed away between the listing and the check
                continue
    return None


def _whole(output: Path) -> bool:
    """Whether every weights file of `output` (a folder or one file) reads back complete."""
    from gguf import GGUFReader
    from safetensors import safe_open

    files = [output] if output.is_file() else [p for p in output.rglob("*") if p.name.endswith(WEIGHTS)]
    try:
        for f in files:
            if f.name.endswith(".gguf"):
                GGUFReader(f)
            else:
                with safe_open(f, "pt") as st:
                    for k in st.keys():
                        st.get_tensor(k)
    except Exception:  # noqa: BLE001 - any failure to read it back is "not whole"
        return False
    return bool(files)


def kill_while_writing(args: list[str], watch: Path, output: Path, suffixes: tuple = WEIGHTS, attempts: int = 4,
                       timeout: float = 300) -> Path:
    """Run the CLI with `args` and SIGKILL it as soon as a file ending in one of `suffixes` appears under `watch`;
    the file it was writing. A write lasts tens of milliseconds, which a busy machine's scheduler can let pass
    unseen, or let end between the look and the kill: then the run finished, its `output` must be whole, and it is
    deleted and the run tried again."""
    for _ in range(attempts):
        # (a log file, not a pipe: a pipe nobody reads could fill up and stall the writer)
        with tempfile.TemporaryFile() as log:
            # at the lowest priority, so that on a busy machine this watcher gets the CPU while the writer writes
            proc = subprocess.Popen(["nice", "-n", "19", *CLI, *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                                    stderr=log)
            deadline = time.time() + timeout
            found = None
            try:
                while time.time() < deadline and proc.poll() is None:
                    found = _being_written(watch, suffixes)
                    if found:
                        proc.send_signal(signal.SIGKILL)
                        proc.wait()
                        break
                    time.sleep(0.001)
                if found is None:
                    log.seek(0)
                    assert proc.returncode == 0, (f"status {proc.returncode}: "
                                                  + log.read().decode(errors="replace")[-2000:])
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        if found and not output.exists():
            print(f"killed while writing {found.relative_to(watch)}")
            return found
        # it finished (before the watcher looked, or between the look and the kill): never half-written
        assert _whole(output), f"{output} exists but does not read back whole"
        shutil.rmtree(output) if output.is_dir() else output.unlink()  # again, from scratch
    raise AssertionError(f"the run finished before it could be killed mid-write, {attempts} times")


def _peft_merged_logits(base: Path, loras: Path, names: list[str], ids: torch.Tensor) -> torch.Tensor:
    """The reference: plain PEFT, each adapter at weight 1, merged."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    peft = PeftModel.from_pretrained(model, str(loras / names[0]), adapter_name=names[0])
    for n in names[1:]:
        peft.load_adapter(str(loras / n), adapter_name=n)
    peft.base_model.set_adapter(names)
    with torch.no_grad():
        return peft.merge_and_unload()(ids).logits


IDS = torch.tensor([[1, 20, 30, 40, 50, 60]])


def test_safetensors_export_killed_mid_write(wide, tmp_path):
    from transformers import AutoModelForCausalLM

    from webui.export.run import export_model

    models, loras = wide
    out = tmp_path / "exports" / "merged"
    out.parent.mkdir()
    args = ["export", "--model", "wide", "--models-dir", str(models), "--loras-dir", str(loras), "--lora", "A",
            "--lora", "B", "--format", "safetensors", "--out", str(out)]
    kill_while_writing(args, out.parent, out)
    assert not out.exists()  # nothing under the final name
    export_model("wide", ["A", "B"], None, "safetensors", out, models, loras)  # the next run
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)(IDS).logits
    torch.testing.assert_close(got, _peft_merged_logits(models / "wide", loras, ["A", "B"], IDS),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.soak  # ~20-30 s on 2 cores: with --soak (the default suite covers safetensors and blend)
def test_gguf_export_killed_mid_write(wide, tmp_path):
    import gguf

    from webui.export.run import export_model

    models, loras = wide
    out = tmp_path / "gguf-out"  # a folder: the file is written inside it
    args = ["export", "--model", "wide", "--models-dir", str(models), "--loras-dir", str(loras), "--lora", "A",
            "--format", "gguf", "--quant", "F32", "--out", str(out)]
    kill_while_writing(args, out, out / "wide+A.F32.gguf", (".gguf",))  # the merged F32 GGUF or the quantized one
    assert not list(out.glob("*.gguf"))  # no GGUF under a final name, whole or not
    target = export_model("wide", ["A"], None, "gguf", out, models, loras, quant="F32")
    reader = gguf.GGUFReader(str(target))
    # the merged q projection of layer 0 equals plain PEFT's merge (F32: no rounding but the float sum)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(models / "wide")), str(loras / "A"))
    want = peft.merge_and_unload().model.layers[0].mlp.down_proj.weight.detach().numpy()
    got = next(t for t in reader.tensors if t.name == "blk.0.ffn_down.weight").data.reshape(want.shape)
    assert abs(got - want).max() < 1e-5


def test_blend_killed_mid_write(wide):
    from safetensors.torch import load_file

    from webui.adapters.files import list_adapters
    from webui.engine import Engine
    from webui.options.config import ModelSpec

    models, loras = wide
    args = ["blend", "--model", "wide", "--models-dir", str(models), "--loras-dir", str(loras), "--lora", "A",
            "--lora", "B", "--weights", "1", "0.5", "--combination", "cat", "--out", "AB"]
    kill_while_writing(args, loras, loras / "AB")
    assert not (loras / "AB").exists()
    assert "AB" not in list_adapters(loras)
    engine = Engine(models, loras)  # the next run
    engine.load(ModelSpec(model="wide", loader="transformers"))
    try:
        out = engine.blend_adapters({"A": 1.0, "B": 0.5}, "AB", "cat")
    finally:
        engine.unload()
    # cat is exact: B_new @ A_new is the weighted sum of the sources' scale * B @ A (PEFT's formula, by hand)
    blend = load_file(out / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_{}.weight"
    want = sum(w * 16 / 384 * load_file(loras / n / "adapter_model.safetensors")[key.format("B")].double()
               @ load_file(loras / n / "adapter_model.safetensors")[key.format("A")].double()
               for n, w in (("A", 1.0), ("B", 0.5)))
    got = blend[key.format("B")].double() @ blend[key.format("A")].double()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.soak  # GPTQModel's quantizer: with --soak
def test_gptq_export_killed_mid_write(gptq_dirs, tmp_path):
    from webui.export.run import export_model

    models, loras = gptq_dirs
    out = tmp_path / "gptq-out" / "merged-gptq"
    out.parent.mkdir()
    args = ["export", "--model", "tiny-float", "--models-dir", str(models), "--loras-dir", str(loras), "--lora", "B",
            "--format", "gptq", "--group-size", str(GPTQ_GROUP), "--out", str(out)]
    kill_while_writing(args, out.parent, out)
    assert not out.exists()
    export_model("tiny-float", ["B"], None, "gptq", out, models, loras, group_size=GPTQ_GROUP)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "gptq"
    assert any(out.glob("*.safetensors"))
