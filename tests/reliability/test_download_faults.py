"""Downloads under faults, as a user runs them (`python download-model.py`): SIGKILLed at random byte offsets
of a multi-file repo on the tests' local hub (webui.testing.fake_hub, `stall_total`) and of an S3 prefix on
moto's server (through webui.testing.stall_proxy); a downloaded folder updated to a new commit with a kill
in the middle; two fetches of the same new adapter at once (hub, S3). References are the source bytes and
their sha256, computed here; a watcher polls the destination while each run is alive, so a file seen under
its final name half-written (or a folder seen as a mix of two commits) fails the test even if a later run
repairs it.
"""
from __future__ import annotations

import hashlib
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.helpers import ROOT, free_port
from webui.hub.files import METADATA, read_metadata
from webui.hub.sources import S3_METADATA
from webui.testing.fake_hub import FakeHub

MB = 1024 * 1024
REPO = "rel/multi"
# Two shards over huggingface_hub's 10 MB write chunk, so a kill inside them leaves bytes on disk to resume.
V1 = {"config.json": b'{"model_type": "llama"}', "README.md": b"# v1\n", "tokenizer.json": b"{}" + os.urandom(5000),
      "model-00001-of-00003.safetensors": os.urandom(11 * MB), "model-00002-of-00003.safetensors": os.urandom(13 * MB),
      "model-00003-of-00003.safetensors": os.urandom(2 * MB)}
# The next commit changes two shards (to other sizes, so a poll can tell the versions apart), the config and
# the tokenizer, drops the README and adds a generation config.
V2 = {**{k: v for k, v in V1.items() if k != "README.md"}, "config.json": b'{"model_type": "llama", "v": 2}',
      "tokenizer.json": b"{}" + os.urandom(6000), "generation_config.json": b"{}",
      "model-00002-of-00003.safetensors": os.urandom(12 * MB), "model-00003-of-00003.safetensors": os.urandom(3 * MB)}
AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
KILLS = 10


def tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Watch(threading.Thread):
    """Polls `folder` until stopped: what it holds under final names (`.incomplete` files included, the metadata
    file aside) must always be, by names and sizes, one of `versions` (or a prefix of it while a first download
    fills the folder, when `partial_ok`); each whole file is checked once against its sha256."""

    def __init__(self, folder: Path, versions: list[dict[str, bytes]], partial_ok: bool = False):
        super().__init__(daemon=True)
        self.folder, self.versions, self.partial_ok = folder, versions, partial_ok
        self.bad: list[str] = []
        self.checked: set[tuple[str, int]] = set()
        self.done = threading.Event()

    def run(self):
        while not self.done.wait(0.01):
            try:
                seen = {p.relative_to(self.folder).as_posix(): p.stat().st_size
                        for p in self.folder.rglob("*") if p.is_file() and p.name not in (METADATA, S3_METADATA)}
            except FileNotFoundError:  # a file renamed away during the walk: look again
                continue
            if not seen:
                continue
            whole = {k: v for k, v in seen.items() if not k.endswith(".incomplete")}
            if self.partial_ok:
                ok = any(all(k in v and len(v[k]) == n for k, n in whole.items()) for v in self.versions)
                ok = ok and all(k.endswith(".incomplete") or k in whole for k in seen)
            else:
                ok = any(seen == {k: len(d) for k, d in v.items()} for v in self.versions)
            if not ok:
                self.bad.append(f"seen: {sorted(seen.items())}")
            for k, n in whole.items():
                if (k, n) not in self.checked:
                    self.checked.add((k, n))
                    try:
                        got = sha((self.folder / k).read_bytes())
                    except FileNotFoundError:
                        continue
                    if got not in {sha(v[k]) for v in self.versions if k in v}:
                        self.bad.append(f"{k}: wrong sha256 under its final name")

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        self.join()


@pytest.fixture
def hub():
    h = FakeHub()
    h.add(REPO, V1)
    yield h
    h.stop()


def hub_env(hub: FakeHub, tmp_path: Path) -> dict:
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf-home"),
           "HF_HUB_DISABLE_TELEMETRY": "1"}
    env.pop("HF_TOKEN", None)
    return env


def start(args: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "download-model.py"), *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(args: list[str], env: dict) -> subprocess.CompletedProcess:
    """A run left alone to the end."""
    return subprocess.run([sys.executable, str(ROOT / "download-model.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120, check=False)


def disk_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.exists() else 0


def kill_when(proc: subprocess.Popen, stalled: threading.Event, folder: Path) -> bool:
    """SIGKILL `proc` once the server has held back its bytes and what the client received has reached the
    disk under `folder` (its size stops changing); False if it finished first."""
    deadline = time.time() + 90
    while not stalled.wait(0.02):
        if proc.poll() is not None:
            proc.communicate()
            return False
        assert time.time() < deadline, "the download neither stalled nor finished"
    size, settle = -1, time.time() + 10
    while (now := disk_bytes(folder)) != size and time.time() < settle:  # the client drains its socket
        size = now
        time.sleep(0.2)
    proc.kill()  # SIGKILL: no handler, no clean-up runs
    proc.communicate()
    return True


def free_hub(hub: FakeHub) -> None:
    hub.stall_total = None
    hub.release.set()
    hub.stalled.clear()
    hub.release.clear()


def test_hub_download_killed_at_random_offsets_resumes_to_exact_files(hub, tmp_path):
    dest = tmp_path / "models" / "rel_multi"
    args = [REPO, "--threads", "1", "--model-dir", str(tmp_path / "models")]
    total = sum(len(v) for v in V1.values())
    offsets = sorted(random.Random(20).sample(range(1, total), KILLS))
    env = hub_env(hub, tmp_path)
    kills = 0
    with Watch(dest, [V1], partial_ok=True) as watch:
        for offset in offsets:
            on_disk = sum(p.stat().st_size for p in dest.glob("*") if p.name != METADATA) if dest.exists() else 0
            hub.stall_total = max(1, offset - on_disk)  # the hub stops after `offset` bytes of the repo in all
            proc = start(args, env)
            kills += kill_when(proc, hub.stalled, dest)
            free_hub(hub)
            assert not (dest / METADATA).exists()  # written last: a killed run never looks finished
        r = finish(args, env)
    assert r.returncode == 0, r.stderr
    assert kills == KILLS and not watch.bad, watch.bad[:3]
    got = tree(dest)
    meta = read_metadata(dest)
    got.pop(METADATA)
    assert {k: sha(v) for k, v in got.items()} == {k: sha(v) for k, v in V1.items()}
    assert meta["sha256"] == {k: sha(v) for k, v in V1.items()} and meta["commit"] == hub.commit(REPO, "main")
    resumed = [e[2] for e in hub.log if e[0] == "GET" and e[2] and not e[2].startswith("bytes=0-")]
    assert resumed, "no run resumed a file part-way (Range request)"


def test_update_to_a_new_commit_switches_whole_or_not_at_all(hub, tmp_path):
    dest = tmp_path / "models" / "rel_multi"
    args = [REPO, "--threads", "1", "--model-dir", str(tmp_path / "models")]
    env = hub_env(hub, tmp_path)
    r = finish(args, env)
    assert r.returncode == 0, r.stderr
    old_commit = hub.commit(REPO, "main")
    hub.add(REPO, V2)
    changed = sum(len(v) for k, v in V2.items() if V1.get(k) != v)
    hub.log.clear()
    with Watch(dest, [V1, V2]) as watch:
        # Killed twice inside the update: at a random point, then (resumed) one byte before its end.
        for kill in ("random", "last byte"):
            staged = sum(disk_bytes(s) for s in dest.parent.glob(".rel_multi.*.partial"))
            unchanged = sum(len(v) for k, v in V2.items() if V1.get(k) == v)  # linked in from the old folder
            left = changed - max(0, staged - unchanged)
            hub.stall_total = random.Random(21).randrange(1, left) if kill == "random" else left - 1
            assert kill_when(start(args, env), hub.stalled, dest.parent)
            free_hub(hub)
            assert tree(dest) == {**V1, METADATA: (dest / METADATA).read_bytes()}  # the old commit, whole
            assert read_metadata(dest)["commit"] == old_commit
        r = finish(args, env)
    assert r.returncode == 0, r.stderr
    assert not watch.bad, watch.bad[:3]
    got = tree(dest)
    got.pop(METADATA)
    assert got == V2 and read_metadata(dest)["commit"] == hub.commit(REPO, "main")
    assert not hub.gets("model-00001-of-00003.safetensors")  # unchanged: kept, not fetched again
    assert [p.name for p in dest.parent.iterdir() if p.name != ".locks"] == ["rel_multi"]


@pytest.fixture(scope="module")
def s3_server():
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield port
    server.stop()


@pytest.fixture
def s3(s3_server, monkeypatch):
    import boto3

    for k, v in {**AWS, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{s3_server}"}.items():
        monkeypatch.setenv(k, v)
    client = boto3.client("s3")
    client.bucket = f"bucket-{free_port()}"
    client.create_bucket(Bucket=client.bucket)
    return client


S3_ADAPTER = {"adapter_config.json": b'{"peft_type": "LORA", "r": 2}', "README.md": b"# s3\n",
              "adapter_model.safetensors": os.urandom(9 * MB), "tokenizer.json": os.urandom(3 * MB)}


def test_s3_download_killed_at_random_offsets_resumes_to_exact_files(s3, s3_server, tmp_path):
    from webui.testing.stall_proxy import StallProxy

    for name, data in S3_ADAPTER.items():
        s3.put_object(Bucket=s3.bucket, Key=f"team/style/{name}", Body=data)
    proxy = StallProxy("127.0.0.1", s3_server)
    env = {**os.environ, **AWS, "AWS_ENDPOINT_URL": proxy.url}
    args = [f"s3://{s3.bucket}/team/style", "--lora-dir", str(tmp_path / "loras")]
    dest = tmp_path / "loras" / "style"
    total = sum(len(v) for v in S3_ADAPTER.values())
    rng = random.Random(22)
    kills = 0
    try:
        with Watch(dest, [S3_ADAPTER]) as watch:
            for _ in range(KILLS):
                stage = dest.parent / ".style.partial"
                kept = sum(len(d) for k, d in S3_ADAPTER.items() if (stage / k).is_file()
                           and (stage / k).stat().st_size == len(d))  # objects finished by earlier runs
                # bytes from the server (listings and headers included) before the stall: less than is left
                proxy.budget = rng.randrange(1, total - kept)
                kills += kill_when(start(args, env), proxy.stalled, dest.parent)
                proxy.reset()
                assert not dest.exists()  # only the hidden staging folder until it is complete
            r = finish(args, env)
    finally:
        proxy.stop()
    assert r.returncode == 0, r.stderr
    assert kills == KILLS and not watch.bad, watch.bad[:3]
    got = tree(dest)
    meta = got.pop(S3_METADATA).decode()
    assert {k: sha(v) for k, v in got.items()} == {k: sha(v) for k, v in S3_ADAPTER.items()}
    for name, data in S3_ADAPTER.items():
        assert f"{sha(data)}  {name}" in meta
    assert sorted(p.name for p in dest.parent.iterdir() if p.name != ".locks") == ["style"]


def run_together(fn, n=2) -> list:
    """`fn()` in n threads started at once; their results (an exception fails the test)."""
    barrier, results, errors = threading.Barrier(n), [], []

    def one():
        barrier.wait()
        try:
            results.append(fn())
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)
    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    return results


LORA = {"adapter_config.json": b'{"peft_type": "LORA", "r": 2}', "adapter_model.safetensors": os.urandom(3 * MB),
        "README.md": b"# lora\n"}


def test_two_fetches_of_the_same_new_hub_adapter_download_it_once(hub, tmp_path, monkeypatch):
    from huggingface_hub import constants

    from webui.hub import fetch_adapter

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    hub.add("rel/lora", LORA)
    hub.stall_total = 1 * MB  # hold the first transfer so the second request arrives while it runs
    threading.Timer(1.0, free_hub, [hub]).start()
    paths = run_together(lambda: fetch_adapter("rel/lora", "hub", tmp_path / "loras"))
    assert paths == [tmp_path / "loras" / "rel_lora"] * 2
    assert len(hub.gets("adapter_model.safetensors")) == 1 and len(hub.gets("/api/models/rel/lora/revision/main")) == 1
    got = tree(paths[0])
    got.pop(METADATA)
    assert got == LORA


def test_two_fetches_of_the_same_new_s3_adapter_download_it_once(s3, tmp_path, monkeypatch):
    from webui.hub import fetch_adapter, sources

    for name, data in LORA.items():
        s3.put_object(Bucket=s3.bucket, Key=f"team/one/{name}", Body=data)
    gets = []
    make = sources._s3_client

    def counting_client(max_retries):
        client = make(max_retries)
        # boto3's own hook, called once per GetObject request with its parameters
        client.meta.events.register("provide-client-params.s3.GetObject",
                                    lambda params, **kw: gets.append(params["Key"]))
        return client
    monkeypatch.setattr(sources, "_s3_client", counting_client)
    paths = run_together(lambda: fetch_adapter(f"s3://{s3.bucket}/team/one", "s3", tmp_path / "loras"))
    assert paths == [tmp_path / "loras" / "one"] * 2
    assert sorted(gets) == sorted(f"team/one/{name}" for name in LORA)  # each object once
    got = tree(paths[0])
    got.pop(S3_METADATA)
    assert got == LORA


def test_two_api_requests_naming_the_same_new_hub_adapter_download_it_once(hub, tiny_models, tmp_path):
    """LoRAX's `adapter_id` + `adapter_source: hub`, twice at once through the real app: one download, and
    both answers are the adapter's (plain PEFT's greedy text with it)."""
    import httpx

    from tests.helpers import AppProcess, peft_reference
    from webui.testing.tiny_models import write_adapter

    base = tiny_models["llama"]
    lora = write_adapter(base, tmp_path / "src" / "api-lora", target_modules=["q_proj", "v_proj"], r=4, seed=5)
    hub.add("rel/api-lora", tree(lora))
    expected = peft_reference(base, {"x": (lora, 1.0)}, "The quick brown fox", 12)[0]
    app = AppProcess("--model", base.name, "--models-dir", str(base.parent), "--loras-dir", str(tmp_path / "loras"),
                     "--nowebui", env={"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0"}).wait_ready()
    try:
        hub.stall_total = 1000  # hold the weights' transfer so the second request arrives while it runs
        threading.Timer(2.0, free_hub, [hub]).start()
        body = {"inputs": "The quick brown fox", "parameters": {"adapter_id": "rel/api-lora", "adapter_source": "hub",
                                                                "max_new_tokens": 12}}
        answers = run_together(lambda: httpx.post(app.url + "/generate", json=body, timeout=120))
    finally:
        app.stop()
    assert [r.status_code for r in answers] == [200, 200], [r.text for r in answers]
    assert [r.json()["generated_text"] for r in answers] == [expected, expected]
    assert len(hub.gets("adapter_model.safetensors")) == 1
