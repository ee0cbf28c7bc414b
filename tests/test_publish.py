"""Publishing adapters and their model cards: `publish` to a hub (webui.testing.fake_hub.FakeHub, which takes
huggingface_hub's create_repo + upload_folder requests) and to S3 (moto's server), each downloaded back with the
plain libraries (huggingface_hub's snapshot_download, boto3) to identical files; private repos, missing or
wrong credentials and bad destinations; the card read back with huggingface_hub's ModelCard and checked
against PEFT's own reading of the adapter; and a tiny training run that writes the card with its losses."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from tests.helpers import free_port, write_data
from webui.errors import BadInput, NotFound, Unauthorized, UploadFailed
from webui.hub.publish import publish
from webui.testing.fake_hub import FakeHub

AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*")
            if p.is_file() and not p.relative_to(folder).as_posix().startswith(".")}


@pytest.fixture
def loras(tmp_path, tiny_models) -> Path:
    """loras/my-lora as PEFT saves it (with PEFT's empty README template), named after a hub base."""
    from webui.testing.tiny_models import write_adapter

    folder = write_adapter(tiny_models["llama"], tmp_path / "loras" / "my-lora", target_modules=["q_proj", "v_proj"],
                           r=2, alpha=4)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "org/tiny-llama"  # as an adapter trained on a hub model names it
    (folder / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    (folder / "huggingface-metadata.txt").write_text("url: where this copy came from\n")  # local bookkeeping
    (folder / "loradeck.json").write_text('{"notes": "private", "tags": ["mine"]}')  # the library's notes
    return folder.parent


@pytest.fixture
def hub(monkeypatch):
    """The fake hub as HF_ENDPOINT, this process allowed online (conftest set HF_HUB_OFFLINE=1), no token."""
    from huggingface_hub import constants

    h = FakeHub()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", h.url)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", "/nonexistent/token")  # nor a saved login
    yield h
    h.stop()


def test_publish_to_the_hub_and_download_back_identical(hub, loras, tmp_path, monkeypatch):
    from huggingface_hub import ModelCard, snapshot_download

    monkeypatch.setenv("HF_TOKEN", hub.token)
    url = publish("my-lora", "hf:me/my-lora", loras_dir=loras, private=True)
    assert url == f"{hub.url}/me/my-lora"
    assert "me/my-lora" in hub.private
    local = tree(loras / "my-lora")
    assert ModelCard.load(loras / "my-lora" / "README.md").data.base_model == "org/tiny-llama"  # card written first
    sent = local.copy()
    sent.pop("huggingface-metadata.txt")  # our download bookkeeping stays home
    sent.pop("loradeck.json")  # and so do the library's notes and tags
    back = snapshot_download("me/my-lora", local_dir=tmp_path / "back", token=hub.token, endpoint=hub.url)
    assert tree(Path(back)) == sent

    # a private repo is invisible without the token
    from huggingface_hub import errors
    with pytest.raises(errors.RepositoryNotFoundError):
        snapshot_download("me/my-lora", local_dir=tmp_path / "anon", token=False, endpoint=hub.url)

    # publishing again after a change sends only what changed
    (loras / "my-lora" / "notes.txt").write_text("second version")
    hub.commits.clear()
    publish("my-lora", "hf:me/my-lora", loras_dir=loras)
    assert hub.commits == [["notes.txt"]]
    assert tree(Path(snapshot_download("me/my-lora", local_dir=tmp_path / "back2", token=hub.token,
                                       endpoint=hub.url))) == {**sent, "notes.txt": b"second version"}


def test_cli_publishes_a_folder_path_and_reports_errors_in_one_line(hub, loras, tmp_path, capsys):
    from webui.cli import main

    folder = tmp_path / "merged-export"
    shutil.copytree(loras / "my-lora", folder)  # any folder the user names, e.g. an export in models/
    assert main(["publish", str(folder), "--to", "hf:me/merged", "--token", hub.token]) == 0
    assert capsys.readouterr().out.strip() == f"{hub.url}/me/merged"
    assert set(hub.repos["me/merged"]["main"]) == {"README.md", "adapter_config.json", "adapter_model.safetensors"}

    before = tree(loras / "my-lora")
    assert main(["publish", "my-lora", "--to", "hf:me/x", "--loras-dir", str(loras)]) == 1  # no token anywhere
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: publishing to the hub needs a write token") and "HF_TOKEN" in err
    assert "me/x" not in hub.repos and tree(loras / "my-lora") == before  # not even the card was written


def test_bad_destinations_tokens_and_names_are_refused_with_nothing_sent(hub, loras, tmp_path, monkeypatch):
    before = tree(loras / "my-lora")
    with pytest.raises(BadInput, match="hf:ORG/NAME"):
        publish("my-lora", "me/my-lora", loras_dir=loras, token=hub.token)
    with pytest.raises(BadInput, match="hf:ORG/NAME"):
        publish("my-lora", "hf:not a repo", loras_dir=loras, token=hub.token)
    with pytest.raises(BadInput, match="escapes the adapters folder"):
        publish("../my-lora", "hf:me/x", loras_dir=loras, token=hub.token)
    with pytest.raises(BadInput, match="not allowed"):
        publish("..", "hf:me/x", loras_dir=loras, token=hub.token)
    with pytest.raises(NotFound, match="my-lora"):
        publish("missing", "hf:me/x", loras_dir=loras, token=hub.token)
    assert hub.log == [] and tree(loras / "my-lora") == before  # nothing sent, nothing changed

    with pytest.raises(Unauthorized, match="refused the token"):
        publish("my-lora", "hf:me/x", loras_dir=loras, token="hf_wrong")
    assert "me/x" not in hub.repos

    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    with pytest.raises(UploadFailed, match="cannot publish to"):
        publish("my-lora", "hf:me/x", loras_dir=loras, token=hub.token)


def test_publish_to_s3_and_download_back_identical(s3_server, loras, tmp_path, monkeypatch):
    import boto3

    for k, v in {**AWS, "AWS_ENDPOINT_URL": s3_server}.items():
        monkeypatch.setenv(k, v)
    s3 = boto3.client("s3")
    bucket = f"bucket-{free_port()}"
    s3.create_bucket(Bucket=bucket)
    assert publish("my-lora", f"s3://{bucket}/team/my-lora/", loras_dir=loras) == f"s3://{bucket}/team/my-lora"
    sent = tree(loras / "my-lora")
    sent.pop("huggingface-metadata.txt")
    sent.pop("loradeck.json")
    objects = s3.list_objects_v2(Bucket=bucket, Prefix="team/my-lora/")["Contents"]
    back = {o["Key"].removeprefix("team/my-lora/"): s3.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
            for o in objects}
    assert back == sent

    # and LoRA Deck's own S3 source gets the same adapter (plus its own s3-metadata.txt)
    from webui.hub import fetch_adapter

    got = tree(fetch_adapter(f"s3://{bucket}/team/my-lora", "s3", tmp_path / "fetched"))
    got.pop("s3-metadata.txt")
    assert got == sent

    with pytest.raises(NotFound):
        publish("my-lora", "s3://no-such-bucket/x", loras_dir=loras)
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(k)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-metadata lookup for credentials
    monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)  # boto3's default session keeps the credentials it found
    with pytest.raises(Unauthorized, match="no AWS credentials"):
        publish("my-lora", f"s3://{bucket}/other", loras_dir=loras)


def test_card_parses_and_holds_the_lora_config_as_peft_reads_it(tmp_path, tiny_models):
    """An rsLoRA + DoRA adapter saved by plain PEFT: the card's front matter parses with huggingface_hub's
    ModelCard.load and names the base; the body has PEFT's r, alpha, targets and the variant flags."""
    from huggingface_hub import ModelCard
    from peft import LoraConfig, PeftConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from webui.adapters.model_card import needs_card, write_adapter_card

    model = AutoModelForCausalLM.from_pretrained(str(tiny_models["llama"]))
    model.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what PEFT records as the base
    folder = tmp_path / "dora"
    get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], use_rslora=True,
                                     use_dora=True, init_lora_weights="gaussian", task_type="CAUSAL_LM")
                   ).save_pretrained(str(folder))
    assert needs_card(folder)  # PEFT's empty template is replaced
    write_adapter_card(folder)
    assert not needs_card(folder)

    card = ModelCard.load(folder / "README.md")
    peft_cfg = PeftConfig.from_pretrained(str(folder))
    assert card.data.base_model == peft_cfg.base_model_name_or_path == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert card.data.library_name == "peft"
    assert {"lora", "rslora", "dora"} <= set(card.data.tags)
    rows = dict(line.strip("|").split("|")[:2] for line in card.text.splitlines() if line.startswith("| "))
    rows = {k.strip(): v.strip() for k, v in rows.items()}
    assert rows["rank (r)"] == str(peft_cfg.r) and rows["alpha"] == str(peft_cfg.lora_alpha)
    assert rows["target modules"] == ", ".join(sorted(peft_cfg.target_modules))
    assert rows["rsLoRA"] == "True" and rows["DoRA"] == "True" and rows["init"] == "gaussian"
    assert "## Training" not in card.text and "## Metrics" not in card.text  # not trained here

    # evaluated here: the Evaluate tab's latest report on this adapter alone (the report format of INTERFACES.md)
    report = tmp_path / "evals" / "20260101-120000" / "report.json"
    report.parent.mkdir(parents=True)
    report.write_text(json.dumps({"model": "m", "loader": "transformers",
                                  "dataset": {"path": "/data/eval.jsonl", "format": "chat", "samples": 12, "tokens": 300},
                                  "results": [{"name": "base", "adapters": {}, "loss": 2.5, "perplexity": 12.1825},
                                              {"name": "dora", "adapters": {"dora": 1.0}, "loss": 2.25,
                                               "perplexity": 9.4877, "delta_loss_vs_base": -0.25}]}))
    write_adapter_card(folder, evals_dir=tmp_path / "evals")
    text = (folder / "README.md").read_text()
    assert "| evaluation loss | 2.2500 |" in text and "| evaluation loss vs base | -0.2500 |" in text
    assert "| evaluation dataset | `eval.jsonl` (12 samples) |" in text

    # an author's own card is never replaced
    (folder / "README.md").write_text("---\nlicense: mit\n---\n# My adapter\nHand-written.\n")
    assert not needs_card(folder)


def test_training_writes_the_card_with_the_losses(tmp_path, tiny_models):
    from huggingface_hub import ModelCard

    from webui.options.training import TrainConfig
    from webui.training.trainer import train

    data = write_data(tmp_path / "data")
    cfg = TrainConfig.from_dict({
        "base_model": "tiny-llama", "output": "carded",
        "dataset": {"path": str(data["instruction"]), "format": "instruction", "eval_fraction": 0.2},
        "lora": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        "training": {"max_steps": 4, "learning_rate": 0.01, "batch_size": 4, "save_steps": 4, "eval_steps": 2,
                     "cutoff_len": 64}})
    out = train(cfg, tiny_models["llama"].parent, tmp_path / "loras", tmp_path / "runs", log=lambda m: None)
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == "tiny-llama" and "lora" in card.data.tags
    rows = [line for line in (out / "README.md").read_text().splitlines() if line.startswith("| ")]
    metrics = [json.loads(line) for line in (tmp_path / "runs" / "carded" / "metrics.jsonl").read_text().splitlines()]
    last_loss = [m for m in metrics if "loss" in m][-1]
    last_eval = [m for m in metrics if "eval_loss" in m][-1]
    assert f"| final train loss | {last_loss['loss']:.4f} (step {last_loss['step']}) |" in rows
    assert f"| final eval loss | {last_eval['eval_loss']:.4f} (step {last_eval['step']}) |" in rows
    assert "| rank (r) | 4 |" in rows and "| target modules | q_proj, v_proj |" in rows
    assert "| steps | 4 |" in rows and "| format | instruction |" in rows
    status = json.loads((tmp_path / "runs" / "carded" / "status.json").read_text())
    assert f"| training samples | {status['samples']} |" in rows and f"| eval samples | {status['eval_samples']} |" in rows
    assert yaml.safe_load((out / "training_config.yaml").read_text())["output"] == "carded"
