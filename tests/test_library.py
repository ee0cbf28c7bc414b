"""The adapter library (webui.adapters.library, report_cache, `python -m webui loras`): listing without reading
tensors, rename / duplicate / delete to the trash / restore keeping every file byte-identical, notes and tags,
names that cannot leave the folder, an adapter in use by the loaded model protected, and compatibility
reports computed in the background, cached on disk and recomputed when an adapter's files or the base change.
References come from PEFT itself (its config reader, and whether it can load the adapter onto the base)."""
import hashlib
import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.helpers import PROMPT, peft_reference, write_llama
from webui.adapters import library
from webui.adapters.report_cache import DiskCache, ReportService, status_of
from webui.engine import Engine
from webui.errors import BadInput, NotFound
from webui.options.config import GenerationParams, ModelSpec
from webui.testing.tiny_models import write_adapter

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("library")
    models = root / "models"
    base = write_llama(models / "tiny", 64)
    other = write_llama(models / "other", 32, seed=3)
    src = root / "src"
    write_adapter(base, src / "A", target_modules=["q_proj", "v_proj"], r=4, alpha=8, seed=1)
    write_adapter(base, src / "B", target_modules="all-linear", r=8, alpha=16, seed=2)
    write_adapter(other, src / "other", target_modules=["q_proj", "v_proj"], r=4, seed=4)
    return models, src


@pytest.fixture
def loras(made, tmp_path):
    _, src = made
    d = tmp_path / "loras"
    shutil.copytree(src, d)
    shutil.copytree(src / "A", d / "broken")
    w = d / "broken" / "adapter_model.safetensors"
    w.write_bytes(w.read_bytes()[:64])
    (d / "style.gguf").write_bytes(b"GGUF" + bytes(range(256)) * 4)  # a single-file GGUF LoRA (never parsed here)
    return d


def digests(path: Path) -> dict:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path.parent if path.is_file() else path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in files}


def peft_loads(base: Path, adapter: Path) -> bool:
    """The reference for compatibility: can PEFT put this adapter on this base?"""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    try:
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base)), str(adapter))
        return True
    except Exception:  # noqa: BLE001  (any refusal by PEFT is the reference's "no")
        return False


def test_scan_reads_configs_like_peft(loras):
    from peft import LoraConfig

    entries = {e.name: e for e in library.scan(loras)}
    assert sorted(entries) == ["A", "B", "broken", "other", "style.gguf"]
    for name in ("A", "B", "other"):
        cfg = LoraConfig.from_pretrained(str(loras / name))
        e = entries[name]
        assert (e.rank, e.alpha, e.kind) == (cfg.r, cfg.lora_alpha, "peft")
        assert set(e.targets) == {t.rsplit(".", 1)[-1] for t in cfg.target_modules}  # shown by layer name
        assert e.base == cfg.base_model_name_or_path
        assert e.size == sum(f.stat().st_size for f in (loras / name).iterdir() if f.name != "README.md")
    assert entries["style.gguf"].kind == "gguf" and entries["style.gguf"].size == (loras / "style.gguf").stat().st_size


def test_round_trip_keeps_files_byte_identical(loras):
    before = {n: digests(loras / n) for n in ("A", "style.gguf")}
    library.set_notes(loras, "A", "q/v only, seed 1")
    library.set_tags(loras, "style.gguf", "Style, v2 style")
    assert library.get(loras, "style.gguf").tags == ["style", "v2"]

    assert library.rename(loras, "A", "A-renamed") == "A-renamed"
    assert library.rename(loras, "style.gguf", "style2") == "style2.gguf"  # a GGUF file keeps its suffix
    assert library.duplicate(loras, "A-renamed", "A-copy") == "A-copy"
    gone = library.delete(loras, "A-renamed")
    gone_gguf = library.delete(loras, "style2.gguf")
    names = [e.name for e in library.scan(loras)]
    assert "A-renamed" not in names and "style2.gguf" not in names and "A-copy" in names
    assert {t.name for t in library.trash(loras)} == {"A-renamed", "style2.gguf"}

    assert library.restore(loras, gone.id, as_name="A") == "A"
    assert library.restore(loras, "style2.gguf") == "style2.gguf"
    assert library.rename(loras, "style2.gguf", "style.gguf") == "style.gguf"
    assert library.trash(loras) == [] and gone_gguf.id not in [p.name for p in (loras / ".trash").iterdir()]
    meta = {"A": {library.META}, "style.gguf": set()}
    for name, want in before.items():
        got = digests(loras / name)
        assert {k: v for k, v in got.items() if k not in meta[name]} == want  # every byte as before
    assert library.get(loras, "A").notes == "q/v only, seed 1"         # notes went along and came back
    assert library.get(loras, "style.gguf").tags == ["style", "v2"]    # the GGUF sidecar too
    assert library.get(loras, "A-copy").notes == "q/v only, seed 1"
    copy = digests(loras / "A-copy")
    assert {k: v for k, v in copy.items() if k != library.META} == before["A"]


def test_bad_names_are_refused_and_change_nothing(loras):
    before = sorted(p.name for p in loras.iterdir())
    for bad in ("../A2", "x/y", ".hidden", "", "..", "/tmp/x", "a\\b", "B"):
        with pytest.raises(BadInput):
            library.rename(loras, "A", bad)
        with pytest.raises(BadInput):
            library.duplicate(loras, "A", bad)
    with pytest.raises(BadInput):
        library.rename(loras, "A", "folder.gguf")  # would be read as a GGUF file
    for missing in ("../A", "nope", "A/../B"):
        with pytest.raises((BadInput, NotFound)):
            library.delete(loras, missing)
    outside = loras.parent / "outside"
    outside.mkdir()
    (loras / "link").symlink_to(outside, target_is_directory=True)
    with pytest.raises((BadInput, NotFound)):
        library.delete(loras, "link")
    (loras / "link").unlink()
    assert sorted(p.name for p in loras.iterdir()) == before
    # restoring over an existing adapter is refused; the trash keeps it
    t = library.delete(loras, "B")
    library.duplicate(loras, "A", "B")
    with pytest.raises(BadInput, match="already exists"):
        library.restore(loras, t.id)
    assert [x.id for x in library.trash(loras)] == [t.id]


def test_select_filters_and_sorts(loras):
    library.set_tags(loras, "B", ["chat"])
    library.set_notes(loras, "other", "made for the small model")
    entries = library.scan(loras)

    def names(rows):
        return [e.name for e in rows]

    assert names(library.select(entries, "chat")) == ["B"]
    assert names(library.select(entries, "small model")) == ["other"]
    assert names(library.select(entries, "", sort="rank"))[0] == "B"
    assert names(library.select(entries, "", sort="size"))[0] == "B"
    bases = {e.name: e.base for e in entries}
    assert names(library.select(entries, base=bases["other"])) == ["other"]
    statuses = {"A": "compatible", "other": "incompatible"}
    assert names(library.select(entries, status="incompatible", statuses=statuses)) == ["other"]
    assert set(names(library.select(entries, status="pending", statuses=statuses))) == {"B", "broken", "style.gguf"}


def test_reports_in_background_cached_and_invalidated(made, loras):
    models, _ = made
    engine = Engine(models, loras)
    engine.load(ModelSpec(model="tiny", loader="transformers"))
    calls = []

    def compute(name):
        calls.append(name)
        return engine.adapter_report(name)

    service = ReportService(loras, compute, engine.base_key)
    entries = [e for e in library.scan(loras) if e.kind == "peft"]
    assert all(r is None for r in service.lookup(entries).values())  # answered at once: pending
    assert service.wait(120)
    got = service.lookup(entries)
    for name in ("A", "B", "other"):  # PEFT decides what fits
        assert (status_of(got[name]) == "compatible") == peft_loads(models / "tiny", loras / name), name
    assert status_of(got["broken"]) == "incompatible" and "corrupt or truncated" in got["broken"]["error"]

    # a new process (a fresh service) finds them on disk and computes nothing
    calls.clear()
    fresh = ReportService(loras, compute, engine.base_key)
    assert all(r is not None for r in fresh.lookup(entries).values()) and fresh.wait(5) and calls == []

    # A's files replaced by an adapter for another base: only A is pending, then incompatible, as PEFT says
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy2(loras / "other" / f, loras / "A" / f)
    entries = [e for e in library.scan(loras) if e.kind == "peft"]
    pending = [n for n, r in fresh.lookup(entries).items() if r is None]
    assert pending == ["A"]
    assert fresh.wait(120)
    assert status_of(fresh.lookup(entries)["A"]) == "incompatible" and not peft_loads(models / "tiny", loras / "A")
    assert calls == ["A"]

    # another base: every report is redone against it
    engine.load(ModelSpec(model="other", loader="transformers"))
    assert all(r is None for r in fresh.lookup(entries).values())
    assert fresh.wait(120)
    assert status_of(fresh.lookup(entries)["other"]) == "compatible" and peft_loads(models / "other", loras / "other")


def test_disk_cache_survives_concurrent_writers(tmp_path):
    def writer(i):
        cache = DiskCache(tmp_path)  # each its own handle, as separate processes would have
        for j in range(15):
            cache.write({f"w{i}-{j}|base": {"signature": "s", "error": "x"}})

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(DiskCache(tmp_path).read()) == 90


def test_loaded_adapter_is_protected(made, loras):
    models, _ = made
    engine = Engine(models, loras)
    engine.load(ModelSpec(model="tiny", loader="transformers"))
    greedy = GenerationParams(temperature=0, max_new_tokens=12)
    engine.set_adapters({"B": 1.0})  # B is cached now, A becomes the active one
    engine.set_adapters({"A": 1.0})
    before = engine.generate(PROMPT, greedy)
    with pytest.raises(BadInput, match="active"), engine.adapter_released("A"):
        library.rename(loras, "A", "A2")
    assert (loras / "A").is_dir() and not (loras / "A2").exists()
    assert engine.generate(PROMPT, greedy) == before == peft_reference(models / "tiny", {"A": (loras / "A", 1.0)},
                                                                       PROMPT, 12)[0]
    # B (cached, not active) may go: the model lets go of it first, and the new name loads from its new files
    with engine.adapter_released("B"):
        library.rename(loras, "B", "B2")
    assert "B" not in engine._backend.adapters_loaded
    engine.set_adapters({"B2": 1.0})
    assert engine.generate(PROMPT, greedy) == peft_reference(models / "tiny", {"B2": (loras / "B2", 1.0)},
                                                             PROMPT, 12)[0]
    with pytest.raises(NotFound):
        engine.set_adapters({"B": 1.0})
    with engine.adapter_released("A"):  # no longer active: it can go to the trash
        library.delete(loras, "A")
    assert engine.generate(PROMPT, greedy) == peft_reference(models / "tiny", {"B2": (loras / "B2", 1.0)},
                                                             PROMPT, 12)[0]


def loras_cli(*args, d: Path):
    return subprocess.run([sys.executable, "-m", "webui", "loras", *args, "--loras-dir", str(d)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, check=False)


def test_cli(loras):
    before = digests(loras / "B")
    r = loras_cli("list", "--json", d=loras)
    assert r.returncode == 0, r.stderr
    rows = {x["name"]: x for x in json.loads(r.stdout)}
    assert rows["B"]["rank"] == json.loads((loras / "B" / "adapter_config.json").read_text())["r"]
    assert rows["B"]["status"] == "pending"  # no report cached yet: the CLI never loads tensors to list
    assert loras_cli("tag", "B", "chat", "v1", d=loras).stdout.split() == ["chat", "v1"]
    assert loras_cli("tag", "B", "v1", "--remove", d=loras).stdout.split() == ["chat"]
    assert loras_cli("note", "B", "my best one", d=loras).returncode == 0
    listed = loras_cli("list", "--search", "best", d=loras)
    assert listed.stdout.split()[0] == "B" and "#chat" in listed.stdout and len(listed.stdout.splitlines()) == 1
    assert loras_cli("list", "--sort", "rank", d=loras).stdout.split()[0] == "B"
    assert loras_cli("rename", "B", "B-new", d=loras).stdout.strip() == "B-new"
    assert loras_cli("duplicate", "B-new", "B-copy", d=loras).returncode == 0
    deleted = loras_cli("delete", "B-new", d=loras)
    assert deleted.returncode == 0 and "restore" in deleted.stdout
    assert "B-new" in loras_cli("trash", d=loras).stdout
    assert loras_cli("restore", "B-new", "--as", "B", d=loras).stdout.strip() == "B"
    assert {k: v for k, v in digests(loras / "B").items() if k != library.META} == before
    assert library.get(loras, "B").notes == "my best one" and library.get(loras, "B").tags == ["chat"]
    bad = loras_cli("rename", "B", "../escape", d=loras)
    assert bad.returncode == 1 and bad.stderr.startswith("error:") and "not allowed" in bad.stderr
    assert not (loras.parent / "escape").exists()
    missing = loras_cli("delete", "nope", d=loras)
    assert missing.returncode == 1 and "not found" in missing.stderr


def test_notes_do_not_change_the_signature(loras):
    """Notes and tags are not part of the adapter: its signature (what cached reports are keyed by) stays."""
    sig = library.get(loras, "A").signature
    library.set_notes(loras, "A", "x")
    library.set_tags(loras, "A", "y")
    assert library.get(loras, "A").signature == sig
