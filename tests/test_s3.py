"""Adapters and models from S3 and from local folders: `fetch_adapter(..., "s3")` and `download-model.py
s3://...` against moto's server mode (a real S3 HTTP endpoint on loopback, reached through
AWS_ENDPOINT_URL as a user would reach MinIO or R2), and the `local` source's confinement to the
adapters folder."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT, free_port
from webui.errors import BadInput, DownloadFailed

AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def adapter_files(tmp_path_factory) -> dict[str, bytes]:
    from webui.testing.tiny_models import build_tokenizer, write_adapter, write_model

    root = tmp_path_factory.mktemp("s3-src")
    base = write_model("llama", root / "models", build_tokenizer())
    lora = write_adapter(base, root / "lora", target_modules=["q_proj"], r=2)
    return {p.name: p.read_bytes() for p in lora.iterdir() if p.is_file()}


@pytest.fixture
def s3(s3_server, monkeypatch):
    """A boto3 client on the moto server, with the environment a user would set; a fresh bucket per test."""
    import boto3

    for k, v in {**AWS, "AWS_ENDPOINT_URL": s3_server}.items():
        monkeypatch.setenv(k, v)
    client = boto3.client("s3")
    bucket = f"bucket-{free_port()}"
    client.create_bucket(Bucket=bucket)
    client.bucket = bucket
    return client


def put_folder(client, prefix: str, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        client.put_object(Bucket=client.bucket, Key=f"{prefix}/{name}", Body=data)


def tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_fetch_adapter_from_s3_lands_in_loras_and_is_reused(s3, adapter_files, tmp_path):
    from webui.adapters.files import list_adapters, read_adapter
    from webui.hub import fetch_adapter

    put_folder(s3, "team/my-lora", adapter_files)
    url = f"s3://{s3.bucket}/team/my-lora"
    seen = []
    path = fetch_adapter(url, "s3", tmp_path / "loras", progress=lambda f, m: seen.append(f))
    assert path == tmp_path / "loras" / "my-lora"
    got = tree(path)
    meta = got.pop("s3-metadata.txt").decode()
    assert got == adapter_files and f"url: {url}" in meta
    assert list_adapters(tmp_path / "loras") == ["my-lora"]  # no staging folder left behind
    assert read_adapter(path).format == "safetensors"
    assert seen[-1] == 1.0

    # Once fetched it is reused without asking S3 (the objects are gone, and it still answers).
    for name in adapter_files:
        s3.delete_object(Bucket=s3.bucket, Key=f"team/my-lora/{name}")
    assert fetch_adapter(url, "s3", tmp_path / "loras") == path


def test_cli_downloads_s3_prefix_and_single_object(s3, s3_server, adapter_files, tmp_path):
    put_folder(s3, "models/tiny", {"config.json": b'{"model_type": "llama"}', "model.safetensors": os.urandom(5000)})
    put_folder(s3, "ggufs", {"tiny.Q4_K_M.gguf": b"GGUF" + os.urandom(3000)})
    put_folder(s3, "loras/style", adapter_files)
    env = {**os.environ, **AWS, "AWS_ENDPOINT_URL": s3_server}
    dirs = ["--model-dir", str(tmp_path / "models"), "--lora-dir", str(tmp_path / "loras")]

    def run(url):
        return subprocess.run([sys.executable, "download-model.py", url, *dirs], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=120)

    r = run(f"s3://{s3.bucket}/models/tiny")
    assert r.returncode == 0, r.stderr
    assert tree(tmp_path / "models" / "tiny")["config.json"] == b'{"model_type": "llama"}'
    r = run(f"s3://{s3.bucket}/ggufs/tiny.Q4_K_M.gguf")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "models" / "tiny.Q4_K_M.gguf").read_bytes()[:4] == b"GGUF"
    r = run(f"s3://{s3.bucket}/loras/style/")
    assert r.returncode == 0, r.stderr
    assert {k: v for k, v in tree(tmp_path / "loras" / "style").items() if k != "s3-metadata.txt"} == adapter_files
    assert r.stdout.strip() == str(tmp_path / "loras" / "style")

    assert run(f"s3://{s3.bucket}/loras/style").returncode == 0  # again: up to date, nothing fetched
    r = run(f"s3://{s3.bucket}/models/tiny")
    assert r.returncode == 0, r.stderr
    (tmp_path / "models" / "mine").mkdir()
    put_folder(s3, "other/mine", {"config.json": b"{}", "model.safetensors": b"x" * 10})
    r = run(f"s3://{s3.bucket}/other/mine")  # a folder of the same name that came from elsewhere is kept
    assert r.returncode == 1 and "already exists" in r.stderr and not any((tmp_path / "models" / "mine").iterdir())

    r = run(f"s3://{s3.bucket}/nothing/here")
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [f"error: nothing at s3://{s3.bucket}/nothing/here"]
    r = run("s3://no-such-bucket-anywhere/x")
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and "not found" in r.stderr


def test_s3_errors_leave_nothing_half_written(s3, adapter_files, tmp_path, monkeypatch):
    from webui.hub import fetch_adapter, sources

    put_folder(s3, "plain-model", {"config.json": b"{}", "model.safetensors": b"x" * 100})
    with pytest.raises(BadInput, match="not a LoRA adapter"):
        fetch_adapter(f"s3://{s3.bucket}/plain-model", "s3", tmp_path / "loras")

    put_folder(s3, "flaky", adapter_files)
    monkeypatch.setattr(sources, "_md5_ok", lambda path, etag: path.name != "adapter_model.safetensors")
    with pytest.raises(DownloadFailed, match="arrived corrupted"):
        fetch_adapter(f"s3://{s3.bucket}/flaky", "s3", tmp_path / "loras")
    assert not (tmp_path / "loras" / "flaky").exists()  # only the hidden staging folder, never listed

    monkeypatch.undo()
    for k, v in {**AWS, "AWS_ENDPOINT_URL": s3.meta.endpoint_url}.items():
        monkeypatch.setenv(k, v)
    assert fetch_adapter(f"s3://{s3.bucket}/flaky", "s3", tmp_path / "loras") == tmp_path / "loras" / "flaky"


def test_unsafe_object_keys_are_refused():
    from webui.hub.sources import _relative_key, safe_name

    assert _relative_key("team/lora/sub/a.json", "team/lora") == "sub/a.json"
    for key in ("team/lora/../../etc/passwd", "team/lora/./x", "team/lora/a\\..\\b"):
        with pytest.raises(DownloadFailed, match="unsafe object key"):
            _relative_key(key, "team/lora")
    assert safe_name("../my lora!") == "my_lora_"


def test_local_source_is_confined_to_the_adapters_folder(adapter_files, tmp_path):
    from webui.hub import fetch_adapter

    loras, outside = tmp_path / "loras", tmp_path / "elsewhere"
    for folder in (loras / "mine", outside / "theirs"):
        folder.mkdir(parents=True)
        for name, data in adapter_files.items():
            (folder / name).write_bytes(data)
    assert fetch_adapter(str(loras / "mine"), "local", loras) == (loras / "mine").resolve()
    assert fetch_adapter("mine", "local", loras) == (loras / "mine").resolve()
    for bad in (str(outside / "theirs"), "../elsewhere/theirs", str(loras)):
        with pytest.raises(BadInput, match="escapes the adapters folder"):
            fetch_adapter(bad, "local", loras)
    assert fetch_adapter(str(outside / "theirs"), "local", loras, restrict_local=False) == (outside / "theirs").resolve()
    (loras / "empty").mkdir()
    with pytest.raises(BadInput, match="adapter_config.json is missing"):
        fetch_adapter("empty", "local", loras)
    with pytest.raises(BadInput, match="adapter_source 'ftp'"):
        fetch_adapter("x", "ftp", loras)
