"""Installing an adapter from this machine or an upload (webui/hub/install.py): a zip of an adapter folder, its
loose files, or a folder path land in the loras folder checked as a PEFT LoRA. Refused, with nothing written
outside the unpacking folder and nothing left in the loras folder: zip members that would leave the folder
(zip-slip: '..', an absolute path), links, a zip that is not a LoRA, and pickled weights (never unpickled)."""
from __future__ import annotations

import os
import pickle
import shutil
import stat
import zipfile
from pathlib import Path

import pytest

from webui.adapters.files import list_adapters
from webui.errors import BadInput, NotFound
from webui.hub.fetch import source_of
from webui.hub.install import install_local, install_upload
from webui.testing.tiny_models import write_adapter


@pytest.fixture(scope="module")
def adapter(tiny_models, tmp_path_factory) -> Path:
    return write_adapter(tiny_models["llama"], tmp_path_factory.mktemp("src") / "style", ["q_proj", "v_proj"])


def zip_of(path: Path, members: dict[str, bytes], links: dict[str, str] | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        for name, target in (links or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, target)
    return path


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def visible(loras: Path) -> list[str]:
    """What the loras folder holds besides the hidden working folders (.uploads, .locks)."""
    return sorted(p.name for p in loras.iterdir() if not p.name.startswith(".")) if loras.exists() else []


def test_a_zip_of_an_adapter_folder_is_installed_under_its_folder_name(adapter, tmp_path):
    loras = tmp_path / "loras"
    archive = zip_of(tmp_path / "download.zip", {f"style/{k}": v for k, v in files_of(adapter).items()})
    path = install_upload([archive], loras)
    assert path == loras / "style" and list_adapters(loras) == ["style"]
    assert files_of(path) == files_of(adapter)
    assert not any((loras / ".uploads").iterdir())  # the unpacking folder is removed


def test_loose_files_and_a_flat_zip_take_the_given_name(adapter, tmp_path):
    loras = tmp_path / "loras"
    loose = [adapter / "adapter_config.json", adapter / "adapter_model.safetensors"]
    with pytest.raises(BadInput, match="name the adapter"):
        install_upload(loose, loras)
    assert install_upload(loose, loras, "mine").name == "mine"
    flat = zip_of(tmp_path / "flat.zip", files_of(adapter))
    assert install_upload([flat], loras).name == "flat"  # the zip's own name
    assert install_upload([flat], loras, "other").name == "other"
    with pytest.raises(BadInput, match="already in the loras folder"):
        install_upload([flat], loras, "mine")
    with pytest.raises(BadInput, match="not allowed"):
        install_upload([flat], loras, "../escape")
    assert visible(loras) == ["flat", "mine", "other"]
    assert files_of(loras / "mine") == {n: files_of(adapter)[n] for n in ("adapter_config.json",
                                                                          "adapter_model.safetensors")}


@pytest.mark.parametrize("member", ["../evil.txt", "style/../../evil.txt", "/tmp/evil.txt", "C:/evil.txt",
                                    "style\\..\\..\\evil.txt"])
def test_zip_slip_is_refused_before_anything_is_written(adapter, tmp_path, member):
    loras = tmp_path / "deep" / "loras"
    archive = zip_of(tmp_path / "slip.zip", {**{f"style/{k}": v for k, v in files_of(adapter).items()},
                                             member: b"owned"})
    with pytest.raises(BadInput, match="outside the adapter's folder"):
        install_upload([archive], loras)
    assert visible(loras) == [] and not any((loras / ".uploads").iterdir())
    assert not list(tmp_path.rglob("evil.txt")) and not Path("/tmp/evil.txt").exists()


def test_links_in_a_zip_are_refused(adapter, tmp_path):
    loras = tmp_path / "loras"
    archive = zip_of(tmp_path / "link.zip", {f"style/{k}": v for k, v in files_of(adapter).items()},
                     links={"style/notes.txt": "/etc/passwd"})
    with pytest.raises(BadInput, match="is a link"):
        install_upload([archive], loras)
    assert visible(loras) == []


def test_a_zip_that_is_not_a_lora_is_refused(adapter, tiny_models, tmp_path):
    loras = tmp_path / "loras"
    model = zip_of(tmp_path / "model.zip", files_of(tiny_models["llama"]))  # a base model, not an adapter
    with pytest.raises(BadInput, match="no adapter_config.json"):
        install_upload([model], loras)
    prefix = zip_of(tmp_path / "prefix.zip", {
        "adapter_config.json": b'{"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 8}',
        "adapter_model.safetensors": (adapter / "adapter_model.safetensors").read_bytes()})
    with pytest.raises(BadInput, match="only LoRA adapters"):
        install_upload([prefix], loras)
    truncated = zip_of(tmp_path / "cut.zip", {
        "adapter_config.json": (adapter / "adapter_config.json").read_bytes(),
        "adapter_model.safetensors": (adapter / "adapter_model.safetensors").read_bytes()[:100]})
    with pytest.raises(BadInput, match="corrupt or truncated"):
        install_upload([truncated], loras)
    junk = tmp_path / "junk.zip"
    junk.write_bytes(b"not a zip")
    with pytest.raises(BadInput, match="not a readable .zip"):
        install_upload([junk], loras)
    two = zip_of(tmp_path / "two.zip", {**{f"a/{k}": v for k, v in files_of(adapter).items()},
                                        **{f"b/{k}": v for k, v in files_of(adapter).items()}})
    with pytest.raises(BadInput, match="holds 2 adapters"):
        install_upload([two], loras)
    assert visible(loras) == []


class Trap:
    """Unpickling this runs code: it writes a marker file (what a malicious adapter_model.bin would do)."""
    marker: Path

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickled_weights_are_never_unpickled_nor_installed(adapter, tmp_path):
    loras = tmp_path / "loras"
    Trap.marker = tmp_path / "pickle-ran"
    bin_only = zip_of(tmp_path / "pickled.zip", {
        "adapter_config.json": (adapter / "adapter_config.json").read_bytes(),
        "adapter_model.bin": pickle.dumps({"x": Trap()})})
    with pytest.raises(BadInput, match="a Python pickle, which an upload never loads"):
        install_upload([bin_only], loras)
    assert not Trap.marker.exists() and visible(loras) == []
    # beside safetensors weights the .bin is left out of the copy (safetensors wins, as when loading)
    both = zip_of(tmp_path / "both.zip", {**files_of(adapter), "adapter_model.bin": pickle.dumps({"x": Trap()})})
    path = install_upload([both], loras, "both")
    assert "adapter_model.bin" not in files_of(path) and "adapter_model.safetensors" in files_of(path)
    assert not Trap.marker.exists()


def test_a_folder_or_zip_on_this_machine_goes_through_the_same_checks(adapter, tmp_path):
    loras = tmp_path / "loras"
    assert install_local(str(adapter), loras) == loras / "style"
    with pytest.raises(BadInput, match="already in the loras folder"):
        install_local(str(adapter), loras)
    with pytest.raises(NotFound, match="no/such/dir: no such folder"):
        install_local("/no/such/dir", loras)
    broken = tmp_path / "broken"
    shutil.copytree(adapter, broken)
    (broken / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 0, "target_modules": ["q_proj"]}')
    with pytest.raises(BadInput, match="rank r=0"):
        install_local(str(broken), loras)
    archive = zip_of(tmp_path / "zipped.zip", {f"zipped/{k}": v for k, v in files_of(adapter).items()})
    assert install_local(str(archive), loras).name == "zipped"
    assert visible(loras) == ["style", "zipped"]


def test_the_source_is_told_from_the_shape_of_the_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "here").mkdir()
    assert [source_of(s) for s in ("org/name", "org/name:dev", "s3://b/p", "/no/such/dir", "./x", "~/x", "here")] \
        == ["hub", "hub", "s3", "local", "local", "local", "local"]


def test_a_zip_bigger_than_the_free_disk_is_refused(adapter, tmp_path, monkeypatch):
    loras = tmp_path / "loras"
    archive = zip_of(tmp_path / "big.zip", {f"style/{k}": v for k, v in files_of(adapter).items()})
    monkeypatch.setattr(shutil, "disk_usage", lambda p: type("U", (), {"free": 10})())
    with pytest.raises(BadInput, match="more than the"):
        install_upload([archive], loras)
    assert visible(loras) == []
