"""The model card (README.md) of an adapter folder, in the Hugging Face hub's card format: YAML front matter
(base_model, library_name: peft, tags) written with huggingface_hub's ModelCardData, then a short body: the
base, the LoRA config, and — when the adapter was trained or evaluated here — the training config, a summary
of the data and the losses. Training writes it into every new adapter; publishing writes it when a folder
has none, or only the empty template PEFT's save_pretrained leaves (a card that came with a downloaded
adapter is the author's, and is never replaced).

    write_adapter_card(Path("loras/my-lora"), run_dir=Path("runs/my-lora"))
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import yaml
from huggingface_hub import ModelCard, ModelCardData

from webui.errors import BadInput

CARD = "README.md"
TRAINING_CONFIG = "training_config.yaml"  # written beside the adapter by webui/training/trainer.py
# what the hub accepts as a repo id in `base_model` (a local path or a file name is said in the body instead)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def needs_card(folder: Path) -> bool:
    """Has `folder` no card of substance: no README.md, or only the empty template PEFT's save_pretrained
    writes ("Model Card for Model ID", every field "[More Information Needed]")? Ours and authors' cards are
    kept (ours holds token counts only training knows)."""
    try:
        text = (Path(folder) / CARD).read_text(encoding="utf-8")
    except OSError:
        return True
    return "# Model Card for Model ID" in text and "[More Information Needed]" in text


def write_adapter_card(folder: Path, run_dir: Path | None = None, train_samples=None, eval_samples=None,
                       evals_dir: Path | None = None) -> Path:
    """Write `folder/README.md` (replacing ours). `run_dir`: the training run (metrics.jsonl, status.json);
    `train_samples`/`eval_samples`: the tokenized samples (webui.training.data.Sample), for the token counts;
    `evals_dir`: where the Evaluate tab keeps its reports, for the adapter's latest evaluation."""
    folder = Path(folder)
    card = adapter_card(folder, run_dir, _data_summary(folder, run_dir, train_samples, eval_samples),
                        latest_evaluation(folder.name, evals_dir) if evals_dir else None)
    card.save(folder / CARD)
    return folder / CARD


def adapter_card(folder: Path, run_dir: Path | None = None, data: dict | None = None,
                 evaluation: dict | None = None) -> ModelCard:
    """The card of the PEFT adapter in `folder` (its adapter_config.json, and training_config.yaml if trained
    here); `data` and `evaluation` as `write_adapter_card` gathers them."""
    folder = Path(folder)
    try:
        cfg = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise BadInput(f"{folder.name}: cannot write a model card without a readable adapter_config.json ({e})") \
            from None
    training = _read_yaml(folder / TRAINING_CONFIG)
    named = str(cfg.get("base_model_name_or_path") or "")
    hub_id = named if _HUB_ID.match(named) else None
    base = hub_id or Path(named).name  # a local folder: its name only (a published card shows no user's paths)
    tags = ["lora", "peft", "loradeck"]
    tags += [t for t, on in (("rslora", cfg.get("use_rslora")), ("dora", cfg.get("use_dora"))) if on]
    data_card = ModelCardData(base_model=hub_id, library_name="peft", tags=tags,
                              pipeline_tag="text-generation" if cfg.get("task_type") == "CAUSAL_LM" else None)
    metrics = _metrics(run_dir) if run_dir else {}
    body = [f"# {folder.name}", "",
            f"A LoRA adapter for `{base or 'an unnamed base model'}`"
            + (", trained with LoRA Deck." if training else "."),
            ("Load it on top of that base with PEFT (`PeftModel.from_pretrained(base, this_folder_or_repo)`), or put "
             "the folder in LoRA Deck's `loras/`."), "",
            "## LoRA config", "", *_table(_lora_rows(cfg))]
    if training:
        body += ["", "## Training", "", *_table(_training_rows(training))]
    if data:
        body += ["", "### Data", "", *_table(list(data.items()))]
    if metrics or evaluation:
        rows = list(metrics.items())
        if evaluation:
            rows += [(f"evaluation {k}", v) for k, v in evaluation.items()]
        body += ["", "## Metrics", "", *_table(rows)]
    return ModelCard(f"---\n{data_card.to_yaml()}\n---\n\n" + "\n".join(body) + "\n")


def _lora_rows(cfg: dict) -> list[tuple[str, object]]:
    targets = cfg.get("target_modules")
    if isinstance(targets, list):
        targets = ", ".join(sorted(targets))
    rows = [("rank (r)", cfg.get("r")), ("alpha", cfg.get("lora_alpha")), ("dropout", cfg.get("lora_dropout")),
            ("target modules", targets), ("rsLoRA", bool(cfg.get("use_rslora"))),
            ("DoRA", bool(cfg.get("use_dora"))), ("init", cfg.get("init_lora_weights")), ("bias", cfg.get("bias"))]
    for key in ("target_parameters", "modules_to_save", "layers_to_transform", "layers_pattern", "rank_pattern",
                "alpha_pattern"):
        if cfg.get(key):
            rows.append((key, json.dumps(cfg[key]) if isinstance(cfg[key], dict) else cfg[key]))
    rows.append(("PEFT type", f"{cfg.get('peft_type', 'LORA')} ({cfg.get('task_type')})"))
    return rows


def _training_rows(training: dict) -> list[tuple[str, object]]:
    t = training.get("training") or {}
    rows = [("steps", training.get("steps")),
            ("epochs" if not t.get("max_steps") else "max steps", t.get("max_steps") or t.get("epochs"))]
    if training.get("method", "sft") != "sft":  # preference tuning: which trainer, and its beta
        rows += [("method", training["method"]), ("beta", t.get("beta"))]
    for key in ("learning_rate", "lr_scheduler", "warmup_steps", "batch_size", "gradient_accumulation",
                "cutoff_len", "optim", "weight_decay", "max_grad_norm", "seed"):
        rows.append((key.replace("_", " "), t.get(key)))
    for key in ("quantization", "loraplus_lr_ratio", "neftune_noise_alpha", "gradient_checkpointing", "packing"):
        if t.get(key) not in (None, "none", 0, 0.0, False):
            rows.append((key.replace("_", " "), t[key]))
    return rows


def _data_summary(folder: Path, run_dir: Path | None, train_samples, eval_samples) -> dict:
    dataset = (_read_yaml(folder / TRAINING_CONFIG).get("dataset")) or {}
    if not dataset:
        return {}
    paths = dataset.get("path")
    paths = paths if isinstance(paths, list) else [paths]
    out = {"files": ", ".join(f"`{Path(str(p)).name}`" for p in paths if p), "format": dataset.get("format")}
    status = _read_json(run_dir / "status.json") if run_dir else {}
    if train_samples is not None:
        out["training samples"] = len(train_samples)
        out["training tokens"] = sum(len(s.input_ids) for s in train_samples)
        out["tokens with loss"] = sum(s.trained_tokens for s in train_samples)
    elif "samples" in status:
        out["training samples"] = status["samples"]
    if eval_samples is not None:
        out["eval samples"] = len(eval_samples)
        out["eval tokens"] = sum(len(s.input_ids) for s in eval_samples)
    elif "eval_samples" in status:
        out["eval samples"] = status["eval_samples"]
    return out


def _metrics(run_dir: Path) -> dict:
    """The last train loss and eval loss a run logged (runs/NAME/metrics.jsonl)."""
    rows = []
    try:
        lines = (Path(run_dir) / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    except OSError:
        return {}
    for line in lines:
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    out = {}
    for key, label in (("loss", "final train loss"), ("eval_loss", "final eval loss")):
        last = [r for r in rows if key in r]
        if last:
            out[label] = f"{last[-1][key]:.4f} (step {last[-1]['step']})"
    return out


def latest_evaluation(name: str, evals_dir: Path) -> dict | None:
    """The newest evaluation of adapter `name` alone at weight 1 among the Evaluate tab's reports
    (`evals_dir/*/report.json`, the format `python -m webui eval` writes)."""
    best = None
    for path in sorted(Path(evals_dir).glob("*/*.json"), key=lambda p: p.stat().st_mtime):
        report = _read_json(path)
        for r in report.get("results") or []:
            if isinstance(r, dict) and r.get("name") == name and r.get("adapters") in ({name: 1.0}, {name: 1}):
                data = report.get("dataset") or {}
                best = {"dataset": f"`{Path(str(data.get('path', '?'))).name}` ({data.get('samples', '?')} samples)",
                        "loss": _num(r.get("loss")), "perplexity": _num(r.get("perplexity")),
                        "loss vs base": _num(r.get("delta_loss_vs_base"))}
    return best


def _num(x) -> str:
    return f"{x:.4f}" if isinstance(x, (int, float)) else str(x)


def _table(rows) -> list[str]:
    return ["| | |", "|---|---|", *(f"| {k} | {_cell(v)} |" for k, v in rows if v not in (None, ""))]


def _cell(v) -> str:
    return str(v).replace("|", "\\|").replace("\n", " ")


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
