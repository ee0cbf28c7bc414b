"""download-model.py against a local stand-in for the Hugging Face hub (`webui.testing.fake_hub.FakeHub`, a loopback
HTTP server answering the routes huggingface_hub calls: model_info, list_repo_tree, HEAD/GET /resolve with
the hub's headers and error codes, LFS files redirected to a "CDN" origin that honours Range). Tiny repos are built
in the test: a tiny Llama, a LoRA on it (two branches), GGUF quantizations, .bin beside .safetensors, a
12 MB shard for interruptions, a gated repo. Downloads run as a user runs them: `python download-model.py`.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import ROOT
from webui.errors import BadInput, DownloadFailed
from webui.testing.fake_hub import FakeHub

BIG = 12 * 1024 * 1024  # over huggingface_hub's 10 MB write chunk, so a cut-off leaves bytes on disk


@pytest.fixture(scope="module")
def repos(tmp_path_factory) -> dict[str, dict[str, bytes]]:
    """The tiny repos' files, generated once for the module."""
    from webui.testing.tiny_models import build_tokenizer, write_adapter, write_model

    root = tmp_path_factory.mktemp("hub-src")
    base = write_model("llama", root / "models", build_tokenizer())
    lora_main = write_adapter(base, root / "lora-main", target_modules=["q_proj", "v_proj"], r=2, seed=1)
    lora_v2 = write_adapter(base, root / "lora-v2", target_modules=["q_proj", "v_proj"], r=2, seed=2)

    def read(folder: Path) -> dict[str, bytes]:
        return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}

    gguf = lambda q: b"GGUF" + q.encode() + os.urandom(2000)  # noqa: E731 - a header is all a download needs
    readme = b"# a tiny test repo\n"
    return {
        "test/tiny-llama": {**read(base), "README.md": readme},
        "test/tiny-lora": {**read(lora_main), "README.md": readme},
        "test/tiny-lora@v2": read(lora_v2),
        "test/quants": {"README.md": readme, "model.Q2_K.gguf": gguf("Q2_K"), "model.Q4_K_M.gguf": gguf("Q4_K_M"),
                        "model.Q8_0.gguf": gguf("Q8_0"), ".gitattributes": b"*.gguf filter=lfs\n"},
        "test/both": {"config.json": b'{"model_type": "llama"}', "model.safetensors": os.urandom(3000),
                      "pytorch_model.bin": os.urandom(3000), "training_args.bin": os.urandom(100),
                      "tokenizer.json": b"{}", "logo.png": os.urandom(50)},
        "test/big": {"config.json": b'{"model_type": "llama"}', "README.md": readme, "tokenizer.json": b"{}",
                     "model-00001-of-00002.safetensors": os.urandom(200_000),
                     "model-00002-of-00002.safetensors": os.urandom(BIG)},
        "test/gated": {"config.json": b"{}", "model.safetensors": os.urandom(1000)},
        "test/pictures": {"README.md": readme, "logo.png": os.urandom(100)},
    }


@pytest.fixture
def hub(repos):
    h = FakeHub()
    for key, files in repos.items():
        repo, _, branch = key.partition("@")
        h.add(repo, files, branch or "main")
    h.gated.add("test/gated")
    yield h
    h.stop()


def download(hub: FakeHub, tmp_path: Path, *args: str, env: dict | None = None, timeout=120, wait=True):
    cmd = [sys.executable, str(ROOT / "download-model.py"), *args, "--model-dir", str(tmp_path / "models"),
           "--lora-dir", str(tmp_path / "loras")]
    full_env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0",
                "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_DISABLE_TELEMETRY": "1", **(env or {})}
    if "HF_TOKEN" not in (env or {}):
        full_env.pop("HF_TOKEN", None)
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)


def tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def one_line_error(r) -> str:
    assert r.returncode != 0, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0]


def test_model_repo_lands_in_models_with_exact_bytes_and_metadata(hub, repos, tmp_path):
    from webui.backends.models import list_models

    r = download(hub, tmp_path, "test/tiny-llama")
    assert r.returncode == 0, r.stderr
    dest = tmp_path / "models" / "test_tiny-llama"
    assert r.stdout.strip() == str(dest)
    got = tree(dest)
    meta = got.pop("huggingface-metadata.txt").decode()
    assert got == repos["test/tiny-llama"]
    assert list_models(tmp_path / "models") == ["test_tiny-llama"]
    assert f"url: {hub.url}/test/tiny-llama" in meta and "branch: main" in meta
    assert f"commit: {hub.commit('test/tiny-llama', 'main')}" in meta and "download date: " in meta
    for path, data in got.items():
        assert f"{hashlib.sha256(data).hexdigest()}  {path}" in meta
    assert not (tmp_path / "loras").exists() or not any((tmp_path / "loras").iterdir())

    # Running it again fetches nothing: every file is already there under its final name.
    hub.log.clear()
    r = download(hub, tmp_path, "test/tiny-llama")
    assert r.returncode == 0 and not [e for e in hub.log if e[0] == "GET" and "/api/" not in e[1]], hub.log


def test_lora_repo_goes_to_loras_and_branches_get_their_own_folder(hub, repos, tmp_path):
    from webui.adapters.files import list_adapters, read_adapter

    assert download(hub, tmp_path, "test/tiny-lora").returncode == 0
    assert download(hub, tmp_path, "test/tiny-lora:v2").returncode == 0
    r = download(hub, tmp_path, "test/tiny-lora", "--branch", "v2", "--output", str(tmp_path / "elsewhere"))
    assert r.returncode == 0, r.stderr
    loras = tmp_path / "loras"
    assert list_adapters(loras) == ["test_tiny-lora", "test_tiny-lora_v2"]
    main, v2 = tree(loras / "test_tiny-lora"), tree(loras / "test_tiny-lora_v2")
    assert "branch: main" in main.pop("huggingface-metadata.txt").decode()
    assert "branch: v2" in v2.pop("huggingface-metadata.txt").decode()
    assert main == repos["test/tiny-lora"] and v2 == repos["test/tiny-lora@v2"]
    assert main["adapter_model.safetensors"] != v2["adapter_model.safetensors"]
    assert read_adapter(loras / "test_tiny-lora_v2").format == "safetensors"
    assert tree(tmp_path / "elsewhere")["adapter_model.safetensors"] == v2["adapter_model.safetensors"]
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").iterdir())


def test_gguf_choice_specific_file_and_file_url(hub, repos, tmp_path):
    r = download(hub, tmp_path, "test/quants")
    assert r.returncode == 0, r.stderr
    assert sorted(tree(tmp_path / "models" / "test_quants")) == ["README.md", "huggingface-metadata.txt",
                                                                  "model.Q4_K_M.gguf"]
    assert "taking model.Q4_K_M.gguf (Q4_K_M)" in r.stderr
    assert "model.Q2_K.gguf" in r.stderr and "model.Q8_0.gguf" in r.stderr  # the others are listed

    r = download(hub, tmp_path, "test/quants", "--specific-file", "model.Q8_0.gguf")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "models" / "model.Q8_0.gguf").read_bytes() == repos["test/quants"]["model.Q8_0.gguf"]

    r = download(hub, tmp_path, f"{hub.url}/test/quants/resolve/main/model.Q2_K.gguf")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "models" / "model.Q2_K.gguf").read_bytes() == repos["test/quants"]["model.Q2_K.gguf"]
    assert not list((tmp_path / "models").glob("*.incomplete"))


def test_safetensors_preferred_exclude_pattern_and_text_only(hub, repos, tmp_path):
    r = download(hub, tmp_path, "test/both")
    assert r.returncode == 0, r.stderr
    assert sorted(tree(tmp_path / "models" / "test_both")) == ["config.json", "huggingface-metadata.txt",
                                                                "model.safetensors", "tokenizer.json"]
    assert "safetensors preferred" in r.stderr

    r = download(hub, tmp_path, "test/tiny-llama", "--exclude-pattern", r"^tokenizer", "--output", str(tmp_path / "ex"))
    assert r.returncode == 0, r.stderr
    got = tree(tmp_path / "ex")
    assert "model.safetensors" in got and not [p for p in got if p.startswith("tokenizer")]

    r = download(hub, tmp_path, "test/tiny-llama", "--text-only", "--output", str(tmp_path / "text"))
    assert r.returncode == 0, r.stderr
    got = tree(tmp_path / "text")
    assert "config.json" in got and "tokenizer.json" in got and "model.safetensors" not in got


def test_dropped_connection_is_resumed_with_a_range_request(hub, repos, tmp_path):
    hub.drop_after["model-00002-of-00002.safetensors"] = BIG - 1_000_000
    r = download(hub, tmp_path, "test/big")
    assert r.returncode == 0, r.stderr
    assert tree(tmp_path / "models" / "test_big")["model-00002-of-00002.safetensors"] == \
        repos["test/big"]["model-00002-of-00002.safetensors"]
    ranges = [e[2] for e in hub.gets("model-00002-of-00002.safetensors")]
    assert len(ranges) == 2 and ranges[0] == "" and ranges[1].startswith("bytes=") and ranges[1] != "bytes=0-"


def test_killed_download_resumes_without_refetching_finished_files(hub, repos, tmp_path):
    shard2 = "model-00002-of-00002.safetensors"
    hub.stall_after[shard2] = BIG - 1_000_000
    proc = download(hub, tmp_path, "test/big", "--threads", "1", wait=False)
    dest = tmp_path / "models" / "test_big"
    part = dest / (shard2 + ".incomplete")
    deadline = time.time() + 60
    while not (part.is_file() and part.stat().st_size >= 10 * 1024 * 1024) and time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    proc.kill()
    proc.communicate()
    hub.release.set()
    kept = part.stat().st_size
    assert kept >= 10 * 1024 * 1024
    assert not (dest / shard2).exists()  # never a partial file under its final name
    assert not (dest / "config.json").exists()  # the folder is not a model until the download completes
    finished = [p for p in ("README.md", "tokenizer.json", "model-00001-of-00002.safetensors") if (dest / p).exists()]
    assert "model-00001-of-00002.safetensors" in finished

    hub.log.clear()
    r = download(hub, tmp_path, "test/big", "--threads", "1")
    assert r.returncode == 0, r.stderr
    got = tree(dest)
    got.pop("huggingface-metadata.txt")
    assert got == repos["test/big"]
    for p in finished:
        assert not hub.gets(p), f"{p} was fetched again"
    (resumed,) = hub.gets(shard2)
    assert resumed[2] == f"bytes={kept}-"  # only the missing tail was fetched


def test_check_finds_a_corrupted_byte(hub, tmp_path):
    assert download(hub, tmp_path, "test/big").returncode == 0
    r = download(hub, tmp_path, "test/big", "--check")
    assert r.returncode == 0, r.stderr
    victim = tmp_path / "models" / "test_big" / "model-00002-of-00002.safetensors"
    with open(victim, "r+b") as fh:
        fh.seek(5_000_000)
        byte = fh.read(1)
        fh.seek(5_000_000)
        fh.write(bytes([byte[0] ^ 0xFF]))
    r = download(hub, tmp_path, "test/big", "--check")
    assert r.returncode == 1
    assert "checksum mismatch" in r.stderr and "model-00002-of-00002.safetensors" in r.stderr.splitlines()[-1]
    assert "model-00001" not in r.stderr


@pytest.mark.parametrize("args, expected", [
    (["test/tiny-llama", "--output", "/proc/version"], "cannot write /proc/version"),
    (["test/tiny-llama", "--exclude-pattern", "(["], "is not a valid regular expression"),
    (["nobody/missing"], "repository not found: nobody/missing"),
    (["test/tiny-llama:no-such-branch"], "branch or revision not found in test/tiny-llama: no-such-branch"),
    (["test/gated"], "test/gated is a gated repository"),
    (["test/pictures"], "nothing usable"),
    (["test/quants", "--specific-file", "model.Q9.gguf"], "not in the repository: model.Q9.gguf"),
    (["not a repo"], "is not a hub repository id"),
])
def test_failures_are_one_line_with_non_zero_exit(hub, tmp_path, args, expected):
    assert expected in one_line_error(download(hub, tmp_path, *args))
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").iterdir())


def test_gated_repo_with_token(hub, repos, tmp_path):
    r = download(hub, tmp_path, "test/gated", env={"HF_TOKEN": "hf_without_access"})
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "gated repository" in r.stderr.splitlines()[-1] and "no access" in r.stderr.splitlines()[-1]
    assert not (tmp_path / "models" / "test_gated").exists()  # nothing left behind
    r = download(hub, tmp_path, "test/gated", env={"HF_TOKEN": hub.token})
    assert r.returncode == 0, r.stderr
    assert tree(tmp_path / "models" / "test_gated")["model.safetensors"] == repos["test/gated"]["model.safetensors"]


def test_server_errors_are_retried_then_given_up(hub, repos, tmp_path):
    hub.fail["model.safetensors"] = 2  # two 503s, then the file
    r = download(hub, tmp_path, "test/gated", env={"HF_TOKEN": hub.token})
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("retrying in") == 2
    assert tree(tmp_path / "models" / "test_gated")["model.safetensors"] == repos["test/gated"]["model.safetensors"]

    hub.fail["model.safetensors"] = 99
    r = download(hub, tmp_path, "test/gated", "--max-retries", "1", "--output", str(tmp_path / "x"),
                 env={"HF_TOKEN": hub.token})
    assert r.returncode == 1 and "model.safetensors: gave up after 2 attempt(s)" in r.stderr.splitlines()[-1]
    assert not (tmp_path / "x" / "model.safetensors").exists()


def test_local_folder_is_copied_in(hub, repos, tmp_path):
    src = tmp_path / "somewhere" / "my-adapter"
    src.mkdir(parents=True)
    for name, data in repos["test/tiny-lora"].items():
        (src / name).write_bytes(data)
    r = download(hub, tmp_path, str(src))
    assert r.returncode == 0, r.stderr
    assert tree(tmp_path / "loras" / "my-adapter") == repos["test/tiny-lora"]
    assert [p.name for p in (tmp_path / "loras").iterdir()] == ["my-adapter"]  # no staging folder left
    # An existing folder is never overwritten by surprise; --clean replaces it.
    (src / "README.md").write_bytes(b"changed")
    assert "already exists" in one_line_error(download(hub, tmp_path, str(src)))
    assert download(hub, tmp_path, str(src), "--clean").returncode == 0
    assert (tmp_path / "loras" / "my-adapter" / "README.md").read_bytes() == b"changed"


@pytest.fixture
def online(monkeypatch, hub):
    """In-process calls: this pytest process imported huggingface_hub with HF_HUB_OFFLINE=1."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    return hub


def test_download_function_reports_progress_for_the_ui(online, repos, tmp_path):
    from webui.hub import download as download_fn

    calls = []
    out = download_fn("test/big", model_dir=tmp_path / "models", lora_dir=tmp_path / "loras",
                      progress=lambda f, msg: calls.append((f, msg)))
    assert out == tmp_path / "models" / "test_big"
    fractions = [f for f, _ in calls if f is not None]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0 and len(fractions) >= 3
    assert any(f is None and "5 of 5 file(s)" in m for f, m in calls)


def test_fetch_adapter_from_hub_is_reused_once_downloaded(online, repos, tmp_path):
    from webui.hub import fetch_adapter

    path = fetch_adapter("test/tiny-lora", "hub", tmp_path / "loras")
    assert path == tmp_path / "loras" / "test_tiny-lora"
    assert tree(path)["adapter_model.safetensors"] == repos["test/tiny-lora"]["adapter_model.safetensors"]
    online.log.clear()
    assert fetch_adapter("test/tiny-lora", "hub", tmp_path / "loras") == path
    assert online.log == []  # no network the second time
    with pytest.raises(BadInput, match="not a LoRA adapter"):
        fetch_adapter("test/tiny-llama", "hub", tmp_path / "loras")
    assert not (tmp_path / "loras" / "test_tiny-llama").exists()


def test_not_enough_disk_space_is_refused_before_downloading(online, monkeypatch, tmp_path):
    import shutil as shutil_mod
    from types import SimpleNamespace

    from webui.hub import download as download_fn

    monkeypatch.setattr(shutil_mod, "disk_usage", lambda p: SimpleNamespace(total=10**9, used=10**9 - 1000, free=1000))
    with pytest.raises(DownloadFailed, match="not enough disk space"):
        download_fn("test/big", model_dir=tmp_path / "models")
    assert not online.gets(".safetensors")


def test_cancel_keeps_the_partial_file_and_a_rerun_completes(online, repos, tmp_path):
    import threading

    from webui.hub import download as download_fn

    shard2 = "model-00002-of-00002.safetensors"
    online.stall_after[shard2] = BIG - 1_000_000
    cancel, errors = threading.Event(), []
    part = tmp_path / "models" / "test_big" / (shard2 + ".incomplete")

    def run():
        try:
            download_fn("test/big", model_dir=tmp_path / "models", cancel=cancel)
        except DownloadFailed as e:
            errors.append(str(e))
    worker = threading.Thread(target=run)
    worker.start()
    deadline = time.time() + 60
    while not (part.is_file() and part.stat().st_size >= 10 * 1024 * 1024) and time.time() < deadline:
        time.sleep(0.05)
    cancel.set()
    online.release.set()
    worker.join(60)
    assert errors and "cancelled" in errors[0]
    assert part.stat().st_size >= 10 * 1024 * 1024 and not (part.parent / shard2).exists()
    assert not [t for t in threading.enumerate() if t.name == "download-hash"]  # the transfers' hashing threads ended
    out = download_fn("test/big", model_dir=tmp_path / "models")
    assert (out / shard2).read_bytes() == repos["test/big"][shard2]


def test_hashes_taken_while_writing_match_the_file_after_resume_and_rewind(tmp_path):
    """The hashes fed as bytes are written (no second read): a resumed `.incomplete` is hashed from its
    existing part first; a server that ignores Range makes http_get rewind (seek + truncate) and send it all."""
    from webui.hub.checksums import HashingWriter
    from webui.hub.files import RemoteFile
    from webui.testing.fake_hub import git_blob_sha1

    data = os.urandom(3 * 1024 * 1024 + 17)
    lfs = RemoteFile("w.safetensors", len(data), hashlib.sha256(data).hexdigest(), "0" * 40)
    plain = RemoteFile("tokenizer.json", len(data), None, git_blob_sha1(data))
    for f in (lfs, plain):
        part = tmp_path / f"{f.path}.incomplete"
        part.write_bytes(data[:1_000_000])  # left by an interrupted run
        with open(part, "ab") as fh:
            out = HashingWriter(fh, part, f)
            out.write(data[1_000_000:2_000_000])
            out.seek(max(out.tell() - 2_000_000, 0))  # http_get's rewind when the server answers 200 to a Range
            out.truncate()
            out.write(data)
        assert part.read_bytes() == data
        assert out.digest_if_matches(f) == hashlib.sha256(data).hexdigest()
        with open(part, "ab") as fh:  # one byte too many: the size check fails
            out = HashingWriter(fh, part, f)
            out.write(b"x")
        assert out.digest_if_matches(f) is None
    wrong = RemoteFile(lfs.path, len(data), hashlib.sha256(b"other").hexdigest(), None)
    part = tmp_path / "w2.incomplete"
    with open(part, "ab") as fh:
        out = HashingWriter(fh, part, wrong)
        out.write(data)
    assert out.digest_if_matches(wrong) is None


def test_a_file_that_does_not_match_the_listing_never_gets_its_name(online, tmp_path, monkeypatch):
    import webui.hub.download  # noqa: F401 - the module; the package's `download` attribute is the function
    hub_download = sys.modules["webui.hub.download"]
    real_plan = hub_download.plan
    shard = "model-00001-of-00002.safetensors"

    def tampered(*args, **kwargs):  # the hub lists another sha256 than the bytes it serves
        p = real_plan(*args, **kwargs)
        p.files = [hub_download.RemoteFile(f.path, f.size, "0" * 64, f.blob_id) if f.path == shard else f
                   for f in p.files]
        return p
    monkeypatch.setattr(hub_download, "plan", tampered)
    dest = tmp_path / "models" / "test_big"
    with pytest.raises(DownloadFailed, match="checksum mismatch"):
        hub_download.download_hub("test/big", model_dir=tmp_path / "models", max_retries=0)
    assert not (dest / shard).exists() and not (dest / (shard + ".incomplete")).exists()
    assert not (dest / "config.json").exists()  # the folder never looks complete


def test_config_is_fetched_alongside_the_weights_but_named_last(online, repos, tmp_path):
    import threading

    from webui.hub import download as download_fn

    shard2 = "model-00002-of-00002.safetensors"
    online.stall_after[shard2] = 1_000_000
    dest = tmp_path / "models" / "test_big"
    done = []
    worker = threading.Thread(target=lambda: done.append(download_fn("test/big", model_dir=tmp_path / "models",
                                                                     threads=4)))
    worker.start()
    try:
        assert online.stalled.wait(60)
        config, part = repos["test/big"]["config.json"], dest / "config.json.incomplete"
        deadline = time.time() + 30
        while not (part.is_file() and part.stat().st_size == len(config)) and time.time() < deadline:
            time.sleep(0.02)
        assert part.read_bytes() == config  # fetched (and checked) already, while the weights still come in
        assert not (dest / "config.json").exists() and not (dest / shard2).exists()
    finally:
        online.release.set()
        worker.join(60)
    assert done == [dest]
    got = tree(dest)
    got.pop("huggingface-metadata.txt")
    assert got == repos["test/big"]


def test_a_missing_local_path_is_named_and_a_failed_fetch_leaves_the_folder_clean(tmp_path, monkeypatch):
    """A path that does not exist is reported as a missing path (leading slash and all), not as a bad hub id; a
    hub fetch that fails leaves nothing in the adapters folder but the hidden lock folder (never listed)."""
    from webui.adapters.files import list_adapters
    from webui.errors import NotFound
    from webui.hub.fetch import download, fetch_adapter

    loras = tmp_path / "loras"
    for spec in ("/no/such/dir", "./no-such-adapter", "~/no-such-adapter-here"):
        with pytest.raises(NotFound, match="no such file or folder") as e:
            download(spec, lora_dir=loras, require_lora=True)
        assert spec in str(e.value)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DownloadFailed):
        fetch_adapter("org/missing", "hub", loras)
    assert [p.name for p in loras.iterdir()] == [".locks"] and list_adapters(loras) == []
